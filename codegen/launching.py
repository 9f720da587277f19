"""How generated launchers start kernels and make buffers, so that a plan can bind a launch once.

A generated module's `launch(...)` computes, from its operands' metadata, each kernel's grid and
argument list, then starts the kernels. A fused op calls it many times with operands of one
signature (runtime.plans), and all but the tensors is the same each time. So launchers write

    start(kernel, grid, *args, **kwargs)     instead of kernel[grid](*args, **kwargs)
    fresh(torch.empty, shape, ...)           for every tensor they make on each call (any function:
                                             torch.zeros, a cached workspace, a table lookup)

and, inside `recording()`, both note what they did: runtime.bound replays a recorded call for new
operands of the same signature, with none of the launcher's Python. (The backward launchers, which
no plan binds, still allocate with torch directly: a recording of one would not be bound.) Code that calls launchers (a
fused op's fast path, a bound launch's replay) notes the views it makes with `viewed(base, view)`,
so that a recording of it traces each view back to the tensor it views.

Tensors kept across calls (FFT tables, split-reduction workspaces) are made with
`persistent(make, ...)`, on a helper thread: a CUDA graph's warm-up and capture route the calling
thread's allocations into the graph's private pool, where a tensor kept past the call does not belong.
"""
from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class Recording:
    """What a launcher did while recorded, in order: (START, kernel, grid, args, kwargs, None) per
    start and (FRESH, make, None, args, kwargs, what it made) per fresh; and {id(view): (view, base)}
    per viewed."""

    steps: list[tuple] = field(default_factory=list)
    derived: dict[int, tuple] = field(default_factory=dict)
    replayed_depth: int = 0  # > 0 while a start's kernel or a fresh's make runs: a replay repeats its work

    @contextlib.contextmanager
    def replayed(self):
        self.replayed_depth += 1
        try:
            yield
        finally:
            self.replayed_depth -= 1


START, FRESH = "start", "fresh"  # the kinds of Recording.steps
_recording: ContextVar[Recording | None] = ContextVar("flashfx_launch_recording", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Record every start and fresh call made in this thread (or task) until the block ends."""
    recorded = Recording()
    token = _recording.set(recorded)
    try:
        yield recorded
    finally:
        _recording.reset(token)


def recording_now() -> bool:
    """Is a recording() block open in this thread (or task)?"""
    return _recording.get() is not None


def start(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), recorded inside recording()."""
    recorded = _recording.get()
    if recorded is None:
        kernel[grid](*args, **kwargs)
        return
    recorded.steps.append((START, kernel, grid, args, kwargs, None))
    with recorded.replayed():
        kernel[grid](*args, **kwargs)


def fresh(make: Callable, *args, **kwargs):
    """make(*args, **kwargs): what a launcher does through PyTorch on each call, making a tensor, a
    tuple of them, or () (a buffer, a cached workspace, a carried state copied into a new one)."""
    recorded = _recording.get()
    if recorded is None:
        return make(*args, **kwargs)
    with recorded.replayed():
        made = make(*args, **kwargs)
    recorded.steps.append((FRESH, make, None, args, kwargs, made))
    return made


def viewed(base: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """`view`, a view of `base`, noted as one inside recording()."""
    recorded = _recording.get()
    if recorded is not None:
        recorded.derived[id(view)] = (view, base)
    return view


_making = threading.local()  # .active: this thread is a persistent() helper, running a make


def persistent(make: Callable, *args):
    """make(*args): tensors a cache keeps across calls, made on a helper thread (and, on CUDA, with its
    work finished before they are returned). Inductor's CUDA graph trees send the calling thread's
    allocations to a graph's private pool while they warm up and record it, check afterwards that
    nothing made there stayed alive, and reuse that memory on replays; the helper's allocations come
    from the ordinary pool. One thread per call (caches miss rarely): no pool of threads that a
    forked process would inherit dead. A make that itself calls persistent runs it inline."""
    if getattr(_making, "active", False):
        return make(*args)
    outcome: dict = {}
    helper = threading.Thread(target=_made, args=(make, args, outcome), name="flashfx-persistent")
    helper.start()
    helper.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["made"]


def _made(make: Callable, args: tuple, outcome: dict) -> None:
    _making.active = True
    try:
        made = make(*args)
        for device in {t.device for t in (made if isinstance(made, tuple) else (made,)) if t.is_cuda}:
            torch.cuda.synchronize(device)
        outcome["made"] = made
    except BaseException as error:  # raised again in the calling thread
        outcome["error"] = error

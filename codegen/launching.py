"""How generated launchers start kernels and make buffers, so that a plan can bind a launch once.

A generated module's `launch(...)` computes, from its operands' metadata, each kernel's grid and
argument list, then starts the kernels. A fused op calls it many times with operands of one
signature (runtime.plans), and all but the tensors is the same each time. So launchers write

    start(kernel, grid, *args, **kwargs)     instead of kernel[grid](*args, **kwargs)
    fresh(torch.empty, shape, ...)           for every tensor they make on each call (any function:
                                             torch.zeros, a cached workspace, a table lookup)

and, inside `recording()`, both note what they did: runtime.bound replays a recorded call for new
operands of the same signature, with none of the launcher's Python. (The backward launchers, which
no plan binds, mostly allocate with torch directly.) Code that calls launchers (a fused op's fast
path, a bound launch's replay) notes the views it makes with `viewed(base, view)`, so that a
recording of it traces each view back to the tensor it views.

Tensors kept across calls (FFT tables, split-reduction workspaces) are made with
`persistent(make, ...)`, on a helper thread: a CUDA graph's warm-up and capture route the calling
thread's allocations into the graph's private pool, where a tensor kept past the call does not belong.
Buffers a call's kernels use only during that call come from a `Scratch`, reused by later calls.
"""
from __future__ import annotations

import contextlib
import math
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


class Scratch:
    """Buffers a launcher's kernels use only while one call runs (split sums, per-chunk cumulative
    sums), viewed in the shapes a call asks for and reused by later calls instead of made anew.

    One set per thread, device, stream and key (a dtype, say): one thread's launches on one stream run
    in order, so a later call's kernels start after this call's are done with the buffers, and threads
    that share a device's default stream keep sets of their own. A set is made with `persistent` (and
    marked as used by its stream), and replaced by one as large as each buffer needs when a call asks
    for more; a replaced set that a CUDA graph captured is kept while its thread lives, as the graph
    replays into it. A zeroed buffer starts zeroed, and the kernels must leave it so.
    """

    SHAPES_PER_SET = 64  # views kept per set, by the shapes asked for; forgotten all at once past it

    def __init__(self, *buffers: tuple[torch.dtype | None, bool]):
        """buffers: (dtype, or None for the key's; zeroed) of each buffer of a set."""
        self.buffers = buffers
        self._local = _ScratchSets()

    def views(self, device: torch.device, key, *shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """Each buffer of this thread's set for (device, current stream, key), viewed contiguous in its
        shape; the same views on every call asking for the same shapes."""
        cuda = _is_cuda(device)
        stream = torch._C._cuda_getCurrentRawStream(device.index) if cuda else 0
        found = self._local.sets.get((device, stream, key))
        views = None if found is None else found.views.get(shapes)
        if views is None:
            found, views = self._viewed((device, stream, key), found, shapes)
        if cuda and not found.captured and torch.cuda.is_current_stream_capturing():
            found.captured = True
        return views

    def _viewed(self, place: tuple, found, shapes: tuple) -> tuple:
        """(the set, its views for `shapes`), the set replaced first where a buffer is too small."""
        device, _, key = place
        needed = [math.prod(shape) for shape in shapes]
        if found is None or any(size > buffer.numel() for size, buffer in zip(needed, found.buffers)):
            sizes = needed
            if found is not None:
                sizes = [max(size, buffer.numel()) for size, buffer in zip(needed, found.buffers)]
                if found.captured:
                    self._local.captured.append(found.buffers)
            found = self._local.sets[place] = _ScratchSet(self._made_for_stream(device, key, sizes))
        if len(found.views) >= self.SHAPES_PER_SET:
            found.views.clear()
        views = found.views[shapes] = tuple(buffer[:size].view(shape)
                                            for buffer, size, shape in zip(found.buffers, needed, shapes))
        return found, views

    def _made_for_stream(self, device: torch.device, key, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        """A new set, made on persistent's helper thread (so on its stream) and marked as used by the
        calling stream: freed when replaced, it is not handed out again before that stream's work on
        it ends."""
        buffers = persistent(self._made, device, key, sizes)
        if device.type == "cuda":
            for buffer in buffers:
                buffer.record_stream(torch.cuda.current_stream(device))
        return buffers

    def _made(self, device: torch.device, key, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        return tuple((torch.zeros if zeroed else torch.empty)(size, dtype=dtype or key, device=device)
                     for (dtype, zeroed), size in zip(self.buffers, sizes))


class _ScratchSets(threading.local):
    """A Scratch's sets in one thread: {(device, stream, key): _ScratchSet}, and the replaced sets a
    CUDA graph captured."""

    def __init__(self):
        self.sets: dict[tuple, _ScratchSet] = {}
        self.captured: list[tuple[torch.Tensor, ...]] = []


_cuda_devices: dict[torch.device, bool] = {}


def _is_cuda(device: torch.device) -> bool:
    """device.type == "cuda", memoised (reading device.type makes a string)."""
    cuda = _cuda_devices.get(device)
    if cuda is None:
        cuda = _cuda_devices[device] = device.type == "cuda"
    return cuda


@dataclass
class _ScratchSet:
    buffers: tuple[torch.Tensor, ...]
    views: dict = field(default_factory=dict)  # {shapes: views}
    captured: bool = False  # a CUDA graph captured a call using it

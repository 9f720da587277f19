"""How generated launchers start kernels and make buffers, so that a plan can bind a launch once.

A generated module's `launch(...)` computes, from its operands' metadata, each kernel's grid and
argument list, then starts the kernels. A fused op calls it many times with operands of one
signature (runtime.plans), and all but the tensors is the same each time. So launchers write

    start(kernel, grid, *args, **kwargs)     instead of kernel[grid](*args, **kwargs)
    fresh(torch.empty, shape, ...)           for every tensor they make on each call (any function:
                                             torch.zeros, a cached workspace, a table lookup)

and, inside `recording()`, both note what they did: runtime.bound replays a recorded call for new
operands of the same signature, with none of the launcher's Python.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class Recording:
    """What a launcher did while recorded: (kernel, grid, args, kwargs) per start, in order, and
    (make, args, kwargs, what it made, their versions then) per fresh."""

    starts: list[tuple] = field(default_factory=list)
    fresh: list[tuple] = field(default_factory=list)


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


def start(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), recorded inside recording()."""
    recorded = _recording.get()
    if recorded is not None:
        recorded.starts.append((kernel, grid, args, kwargs))
    kernel[grid](*args, **kwargs)


def fresh(make: Callable, *args, **kwargs):
    """make(*args, **kwargs): a tensor (or tuple of tensors) the launcher makes on each call."""
    made = make(*args, **kwargs)
    recorded = _recording.get()
    if recorded is not None:
        tensors = made if isinstance(made, tuple) else (made,)
        recorded.fresh.append((make, args, kwargs, made, [version(t) for t in tensors]))
    return made


def version(tensor) -> int | None:
    """A tensor's version counter (what in-place writes through PyTorch move); None for an inference
    tensor, which keeps none, or for what is not a tensor."""
    if not isinstance(tensor, torch.Tensor) or tensor.is_inference():
        return None
    return tensor._version

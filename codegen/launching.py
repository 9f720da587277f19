"""How generated launchers start kernels and make buffers, so that a plan can bind a launch once.

A generated module's `launch(...)` computes, from its operands' metadata, each kernel's grid and
argument list, then starts the kernels. A fused op calls it many times with operands of one
signature (runtime.plans), and all but the tensors is the same each time. So launchers write

    start(kernel, grid, *args, **kwargs)     instead of kernel[grid](*args, **kwargs)
    fresh(torch.empty, shape, ...)           for every tensor they make on each call (any function:
                                             torch.zeros, a cached workspace, a table lookup)

and `bind(launch, args, kwargs)` runs one call while recording what it started: each kernel's
grid and arguments, each tensor argument traced back to where it came from

    an operand of the call        the launcher's own tensor argument, or a view of it
    a fresh buffer                the result of one fresh(...) call, or a view of it

A Bound replays the recording for new operands of the same signature: it redoes each fresh(...)
call, substitutes the tensors and starts the same kernels, with none of the launcher's Python.
A recording it cannot replay exactly returns no Bound (the caller keeps calling the launcher):
a tensor argument of any other origin (a copy, a random draw), one whose source is ambiguous (the
same tensor passed as two operands, or a view of storage two operands share), a fresh buffer or
operand written by PyTorch during the call (its version counter moved: a replay would skip the
write; inference tensors keep no counter), or a tensor inside a kernel's keyword arguments. What
the launcher reads besides tensors (scale, config, lengths) must be decided by the plan's key;
runtime.plans.Launch binds only once its config is final.
"""
from __future__ import annotations

import contextlib
import operator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch

_recording: ContextVar[_Recording | None] = ContextVar("flashfx_launch_recording", default=None)


def start(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), recorded while bind() records."""
    recording = _recording.get()
    if recording is not None:
        recording.launches.append((kernel, grid, args, kwargs))
    kernel[grid](*args, **kwargs)


def fresh(make: Callable, *args, **kwargs):
    """make(*args, **kwargs): a tensor (or tuple of tensors) the launcher makes on each call."""
    made = make(*args, **kwargs)
    recording = _recording.get()
    if recording is not None:
        recording.fresh.append((make, args, kwargs, made))
    return made


class _Recording:
    def __init__(self):
        self.launches: list[tuple] = []
        self.fresh: list[tuple] = []


class Unbindable(Exception):
    """A recorded launch a Bound cannot replay exactly."""


@dataclass(frozen=True)
class _Source:
    """Where a tensor comes from in a replay: tensors[index] (operands, then fresh results), or a
    view of it (size, stride, storage offset relative to it, dtype of the same item size)."""

    index: int
    view: tuple | None = None

    def of(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        tensor = tensors[self.index]
        if self.view is None:
            return tensor
        size, stride, offset, dtype = self.view
        viewed = tensor.as_strided(size, stride, tensor.storage_offset() + offset)
        return viewed if viewed.dtype == dtype else viewed.view(dtype)


class _Tracer:
    """Traces a recorded call's tensors back to the operands and fresh results (_Source)."""

    def __init__(self, operands: list):
        self.known: list = list(operands)  # a positional operand may be None

    def add(self, tensor: torch.Tensor) -> None:
        self.known.append(tensor)

    def source(self, tensor: torch.Tensor) -> _Source:
        found = [index for index, known in enumerate(self.known) if tensor is known]
        if len(found) > 1:
            raise Unbindable("a tensor argument is passed as two operands: which one a replay should take is unknown")
        if found:
            return _Source(found[0])
        storage = _storage(tensor)
        sharing = [index for index, known in enumerate(self.known)
                   if isinstance(known, torch.Tensor) and _storage(known) == storage]
        if len(sharing) != 1 or tensor.element_size() != self.known[sharing[0]].element_size():
            raise Unbindable(f"a tensor argument of {tuple(tensor.shape)} is neither an operand, a fresh buffer "
                             "nor a view of exactly one of them")
        (index,) = sharing
        offset = tensor.storage_offset() - self.known[index].storage_offset()
        return _Source(index, (tuple(tensor.shape), tensor.stride(), offset, tensor.dtype))

    def args(self, values) -> tuple[tuple, tuple[tuple[int, _Source], ...]]:
        """(values with None for each tensor, so that no recorded tensor is kept alive; (position,
        source) of each tensor)."""
        slots = tuple((position, self.source(value)) for position, value in enumerate(values)
                      if isinstance(value, torch.Tensor))
        return tuple(None if isinstance(value, torch.Tensor) else value for value in values), slots


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@dataclass(frozen=True)
class _Fresh:
    make: Callable
    args: tuple
    slots: tuple  # tensors among args
    kwargs: dict
    count: int  # tensors it makes: 1, or the length of the tuple it returns


@dataclass(frozen=True)
class _Start:
    kernel: object
    grid: tuple
    args: tuple
    slots: tuple
    kwargs: dict


class Bound:
    """A recorded launch, replayed for operands of the same signature (module docstring)."""

    def __init__(self, tensor_kwargs: tuple[str, ...], fresh: tuple[_Fresh, ...], starts: tuple[_Start, ...],
                 result: object):
        self.tensor_kwargs = tensor_kwargs
        self._kwarg_tensors = _getter(tensor_kwargs)
        self.fresh = tuple((made.make, _arguments(made.args, made.slots), made.kwargs, made.count) for made in fresh)
        self.starts = tuple((start.kernel, start.grid, _arguments(start.args, start.slots), start.kwargs)
                            for start in starts)
        self.result = result  # a _Source, a tuple of them, or a constant (None)

    def __call__(self, *args, **kwargs):
        tensors = [*args, *self._kwarg_tensors(kwargs)]
        for make, arguments, make_kwargs, count in self.fresh:
            made = make(*arguments(tensors), **make_kwargs)
            tensors += made if count != 1 else (made,)
        for kernel, grid, arguments, kernel_kwargs in self.starts:
            kernel[grid](*arguments(tensors), **kernel_kwargs)
        return _result(self.result, tensors)


def _arguments(values: tuple, slots) -> Callable[[list], tuple]:
    """A function of a replay's tensors returning `values` with each slot's tensor in place: generated
    as one tuple expression (constants[i], tensors[j] or sources[i].of(tensors) per position), so a
    replay pays one call per kernel whatever its number of arguments."""
    sources = dict(slots)
    items = [f"constants[{position}]" if position not in sources
             else f"tensors[{sources[position].index}]" if sources[position].view is None
             else f"sources[{position}].of(tensors)" for position in range(len(values))]
    expression = f"lambda tensors: ({''.join(item + ', ' for item in items)})"
    return eval(expression, {"constants": values, "sources": sources})


def _getter(names: tuple[str, ...]) -> Callable[[dict], tuple]:
    """A function of a dict returning the values at `names`, as a tuple."""
    if len(names) == 1:
        (name,) = names
        return lambda values: (values[name],)
    return operator.itemgetter(*names) if names else lambda values: ()


def _result(result, tensors):
    if isinstance(result, _Source):
        return result.of(tensors)
    if isinstance(result, tuple):
        return tuple(_result(item, tensors) for item in result)
    return result


def bind(launch: Callable, args: tuple, kwargs: dict) -> tuple[Bound | None, object]:
    """(a Bound replaying launch(*args, **kwargs), or None where it cannot; what this call returned).

    The call runs for real. Its positional args are tensors (or None); a replay takes the same
    positional args and keyword tensors, the rest of its keyword args being the recorded call's."""
    recording = _Recording()
    token = _recording.set(recording)
    operands = [*args, *(value for value in kwargs.values() if isinstance(value, torch.Tensor))]
    versions = [_version(t) for t in operands if t is not None]
    try:
        result = launch(*args, **kwargs)
    finally:
        _recording.reset(token)
    tensor_kwargs = tuple(name for name, value in kwargs.items() if isinstance(value, torch.Tensor))
    with contextlib.suppress(Unbindable):
        if [_version(t) for t in operands if t is not None] != versions:
            raise Unbindable("the launcher wrote an operand through PyTorch")
        return _bound(recording, operands, tensor_kwargs, result), result
    return None, result


def _bound(recording: _Recording, operands: list[torch.Tensor], tensor_kwargs: tuple[str, ...], result) -> Bound:
    tracer = _Tracer(operands)
    fresh = []
    for make, args, kwargs, made in recording.fresh:
        values, slots = tracer.args(args)
        outputs = made if isinstance(made, tuple) else (made,)
        if any(not isinstance(t, torch.Tensor) or _version(t) for t in outputs) or _has_tensor(kwargs):
            raise Unbindable("a fresh buffer was written by PyTorch, or is not a tensor")
        fresh.append(_Fresh(make, values, slots, kwargs, len(outputs) if isinstance(made, tuple) else 1))
        for output in outputs:
            tracer.add(output)
    starts = []
    for kernel, grid, args, kwargs in recording.launches:
        if _has_tensor(kwargs):
            raise Unbindable("a kernel takes a tensor by keyword")
        values, slots = tracer.args(args)
        starts.append(_Start(kernel, grid, values, slots, kwargs))
    return Bound(tensor_kwargs, tuple(fresh), tuple(starts), _traced_result(tracer, result))


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter; None for an inference tensor, which keeps none (so a write to it
    goes unseen: generated launchers write only through their kernels)."""
    return None if tensor.is_inference() else tensor._version


def _has_tensor(kwargs: dict) -> bool:
    return any(isinstance(value, torch.Tensor) for value in kwargs.values())


def _traced_result(tracer: _Tracer, result):
    if isinstance(result, torch.Tensor):
        return tracer.source(result)
    if isinstance(result, tuple):
        return tuple(_traced_result(tracer, item) for item in result)
    if result is None:
        return None
    raise Unbindable(f"the launcher returned a {type(result).__name__}")

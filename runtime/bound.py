"""A plan's kernel launch, bound on its first call and replayed after it.

A planned Launch (one per plan, runtime.plans) calls its generated module's launcher once, recording
what it did (codegen.launching): each kernel's grid and arguments, every tensor argument traced
back to where it came from

    an operand of the call        the launcher's own tensor argument, or a view of it
    a fresh buffer                the result of one fresh(...) call, or a view of it

Later calls replay the recording (Bound) for new operands of the same signature: each fresh(...)
call is made again, the tensors are put in place and the same kernels start, with none of the
launcher's Python. A recording that a replay could not repeat exactly is not bound (the launcher
then runs on every call): a tensor argument of any other origin (a copy, a random draw), one whose
source is ambiguous (the same tensor passed as two operands, or a view of storage two operands
share), a fresh buffer or operand written through PyTorch during the call (its version counter
moved: a replay would skip the write; inference tensors keep no counter, and generated launchers
write only through their kernels), a tensor among a kernel's keyword arguments, or a return value
that is not a tensor. What the launcher reads besides tensors (scale, config, lengths) must be
decided by the plan's key; a Launch binds only once its config is final.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from codegen.launching import Recording, recording, version
from runtime.plans import View

UNBOUND = object()  # Launch.bound before the launch's first call


@dataclass
class Launch:
    """A planned kernel launch: its generated module and Kernel; the config, looked up on its first
    launch; the launcher's call bound on the first start()."""

    module: object
    kernel: object
    config: dict | None = None
    bound: object = UNBOUND  # a Bound, or None where the launcher cannot be bound

    def start(self, *tensors, **options):
        """module.launch(*tensors, config=config, **options), replayed by a Bound after the first call:
        positional args are tensors (or None), and the options that are not tensors are the same on
        every call with this plan (the plan's key decides them)."""
        if self.bound is UNBOUND:
            self.bound, result = bind(self.module.launch, tensors, {**options, "config": self.config})
            return result
        if self.bound is None:
            return self.module.launch(*tensors, config=self.config, **options)
        return self.bound(*tensors, **options)


class Unbindable(Exception):
    """A recorded launch a Bound cannot replay exactly."""


@dataclass(frozen=True)
class _Source:
    """Where a tensor comes from in a replay: tensors[index] (operands, then fresh results), or a
    View of it read as `dtype` (of the same item size: a bool mask read as uint8)."""

    index: int
    view: View | None = None
    dtype: torch.dtype | None = None

    def of(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        tensor = tensors[self.index]
        if self.view is None:
            return tensor
        viewed = self.view.of(tensor)
        return viewed if viewed.dtype == self.dtype else viewed.view(self.dtype)


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
        storage = tensor.untyped_storage().data_ptr()
        sharing = [index for index, known in enumerate(self.known)
                   if isinstance(known, torch.Tensor) and known.untyped_storage().data_ptr() == storage]
        if len(sharing) != 1 or tensor.element_size() != self.known[sharing[0]].element_size():
            raise Unbindable(f"a tensor argument of {tuple(tensor.shape)} is neither an operand, a fresh buffer "
                             "nor a view of exactly one of them")
        (index,) = sharing
        source = self.known[index]
        view = View(tuple(tensor.shape), tensor.stride(), tensor.storage_offset() - source.storage_offset())
        return _Source(index, view, tensor.dtype)

    def arguments(self, values: tuple) -> Callable[[list], tuple]:
        """A function of a replay's tensors returning `values` with each tensor put back in place: one
        generated tuple expression (constants[i], tensors[j] or sources[i].of(tensors) per position),
        so a replay pays one call per kernel whatever its number of arguments. The recorded tensors
        themselves are not kept."""
        sources = {position: self.source(value) for position, value in enumerate(values)
                   if isinstance(value, torch.Tensor)}
        constants = tuple(None if position in sources else value for position, value in enumerate(values))
        items = [f"constants[{position}]" if position not in sources
                 else f"tensors[{sources[position].index}]" if sources[position].view is None
                 else f"sources[{position}].of(tensors)" for position in range(len(values))]
        expression = f"lambda tensors: ({''.join(item + ', ' for item in items)})"
        return eval(expression, {"constants": constants, "sources": sources})

    def result(self, result):
        """A recorded return value as _Sources (a tensor, a tuple of them) or None."""
        if isinstance(result, torch.Tensor):
            return self.source(result)
        if isinstance(result, tuple):
            return tuple(self.result(item) for item in result)
        if result is None:
            return None
        raise Unbindable(f"the launcher returned a {type(result).__name__}")


class Bound:
    """A recorded launch, replayed for operands of the same signature (module docstring)."""

    def __init__(self, tensor_kwargs: tuple[str, ...], fresh: list[tuple], starts: list[tuple], result: object):
        self._kwarg_tensors = _getter(tensor_kwargs)
        self.fresh = fresh  # (make, its arguments from the tensors, its kwargs, how many tensors it makes)
        self.starts = starts  # (kernel, grid, its arguments from the tensors, its kwargs)
        self.result = result  # a _Source, a tuple of them, or None

    def __call__(self, *args, **kwargs):
        tensors = [*args, *self._kwarg_tensors(kwargs)]
        for make, arguments, make_kwargs, count in self.fresh:
            made = make(*arguments(tensors), **make_kwargs)
            tensors += made if count != 1 else (made,)
        for kernel, grid, arguments, kernel_kwargs in self.starts:
            kernel[grid](*arguments(tensors), **kernel_kwargs)
        return _result(self.result, tensors)


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
    operands = [*args, *(value for value in kwargs.values() if isinstance(value, torch.Tensor))]
    versions = [version(t) for t in operands]
    with recording() as recorded:
        result = launch(*args, **kwargs)
    tensor_kwargs = tuple(name for name, value in kwargs.items() if isinstance(value, torch.Tensor))
    with contextlib.suppress(Unbindable):
        if [version(t) for t in operands] != versions:
            raise Unbindable("the launcher wrote an operand through PyTorch")
        return _bound(recorded, operands, tensor_kwargs, result), result
    return None, result


def _bound(recorded: Recording, operands: list, tensor_kwargs: tuple[str, ...], result) -> Bound:
    tracer = _Tracer(operands)
    fresh = []
    for make, args, kwargs, made, versions in recorded.fresh:
        outputs = made if isinstance(made, tuple) else (made,)
        if not all(isinstance(t, torch.Tensor) for t in outputs) or _has_tensor(kwargs):
            raise Unbindable("a fresh(...) call made something other than tensors, or took a tensor by keyword")
        if [version(t) for t in outputs] != versions:
            raise Unbindable("a fresh buffer was written through PyTorch during the call")
        fresh.append((make, tracer.arguments(args), kwargs, len(outputs) if isinstance(made, tuple) else 1))
        for output in outputs:
            tracer.add(output)
    starts = []
    for kernel, grid, args, kwargs in recorded.starts:
        if _has_tensor(kwargs):
            raise Unbindable("a kernel takes a tensor by keyword")
        starts.append((kernel, grid, tracer.arguments(args), kwargs))
    return Bound(tensor_kwargs, fresh, starts, tracer.result(result))


def _has_tensor(kwargs: dict) -> bool:
    return any(isinstance(value, torch.Tensor) for value in kwargs.values())

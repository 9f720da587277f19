"""A plan's kernel launch, bound on its first call and replayed after it; likewise a fast path.

A planned Launch (one per plan, runtime.plans) calls its generated module's launcher once, recording
what it did (codegen.launching): each kernel's grid and arguments, every tensor argument traced
back to where it came from

    an operand of the call        the launcher's own tensor argument, or a view of it
    a fresh buffer                the result of one fresh(...) call, or a view of it

(a view noted with `viewed` is traced through the tensor it views, so views of operands that share
storage stay apart). Later calls replay the recording (Bound) for new operands of the same
signature: each fresh(...) call is made again, the tensors are put in place and the same kernels
start, with none of the launcher's Python. A kernel takes a view at the start of its base, of the
same dtype, as the base itself: it reads only the pointer (strides and sizes are its int arguments).

A fused op's fast path (runtime.dispatch) is bound the same way (FastCall): its views, its
allocations and the bound launches it calls are recorded as one call, and replayed as one.

A recording that a replay could not repeat exactly is not bound (the function then runs on every
call):

    a tensor argument of any other origin          a copy, a random draw
    one whose source is ambiguous                  the same tensor passed as two operands, or an
                                                   unnoted view of storage two operands share
    a PyTorch op other than a view that the call   a write, a compare, a copy: a replay would skip it
    runs itself, outside kernels and fresh calls
    a tensor a replay could not put in place       among a kernel's keyword arguments, or inside
                                                   another argument (a tuple, a TMA descriptor)
    a return value that is not a tensor

What the launcher reads besides tensors (scale, config, lengths) must be decided by the plan's
key; a Launch binds only once its config is final.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from codegen.launching import FRESH, Recording, fresh, recording, recording_now, start, viewed
from runtime.plans import View

UNBOUND = object()  # Launch.bound before the launch's first call


@dataclass
class Launch:
    """A planned kernel launch: its generated module and Kernel; the config, looked up on its first
    launch; the launcher's call, a FastCall made on the first start() (bound then, replayed after)."""

    module: object
    kernel: object
    config: dict | None = None
    _call: FastCall | None = field(default=None, init=False, repr=False)

    def start(self, *tensors, **options):
        """module.launch(*tensors, config=config, **options), replayed by a Bound after the first call:
        positional args are tensors (or None), and the options that are not tensors are the same on
        every call with this plan (the plan's key decides them)."""
        if self._call is None:
            self._call = FastCall(functools.partial(self.module.launch, config=self.config))
        return self._call(*tensors, **options)

    @property
    def bound(self):
        """UNBOUND before the first start(), then a Bound, or None where the launcher cannot be bound."""
        return UNBOUND if self._call is None else self._call.bound


class FastCall:
    """A function of tensors (and options the same on every call) made of views (noted with
    `viewed`), fresh(...) calls and kernel starts, directly or through Bounds it calls: a launcher, or
    a fused op's fast path (runtime.dispatch). Bound on its first call and replayed after it; where it
    cannot be bound, the function itself runs on every call. A call inside another's recording only
    runs (its steps are the outer recording's), and the FastCall binds on a later call."""

    def __init__(self, function: Callable):
        self.function = function
        self.bound = UNBOUND

    def __call__(self, *args, **kwargs):
        if self.bound is UNBOUND:
            if recording_now():  # inside another call's recording: run, so that it records this one's steps
                return self.function(*args, **kwargs)
            self.bound, result = bind(self.function, args, kwargs)
            return result
        if self.bound is None:
            return self.function(*args, **kwargs)
        return self.bound(*args, **kwargs)

    def direct(self) -> Callable:
        """This call with no layer in between, for a caller outside any recording: the Bound's replay
        (a function of the positional tensors) where it is bound and takes no keyword tensors, else self."""
        bound = self.bound
        return bound.replay if isinstance(bound, Bound) and not bound.tensor_kwargs else self


def direct_once_bound(fast: FastCall) -> Callable:
    """A function calling `fast` until a call has bound it, then FastCall.direct's function with no
    layer in between; for a caller outside any recording (a fast path wrapping a FastCall)."""
    target = None

    def call(*tensors):
        nonlocal target
        if target is not None:
            return target(*tensors)
        result = fast(*tensors)
        if fast.bound is not UNBOUND:
            target = fast.direct()
        return result

    return call


class Unbindable(Exception):
    """A recorded launch a Bound cannot replay exactly."""


@dataclass(frozen=True)
class _Source:
    """Where a tensor comes from in a replay: tensors[index] (operands, then fresh results), or a
    View of it read as `dtype` (of the same item size: a bool mask read as uint8)."""

    index: int
    view: View | None = None
    dtype: torch.dtype | None = None

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This source's view of tensor, the tensor at `index`."""
        view = self.view.of(tensor)
        return view if view.dtype == self.dtype else viewed(tensor, view.view(self.dtype))


class _Tracer:
    """Traces a recorded call's tensors back to the operands and fresh results (_Source)."""

    def __init__(self, operands: list, derived: dict[int, tuple]):
        self.known: list = list(operands)  # a positional operand may be None
        self.derived = derived  # Recording.derived: the views noted during the call

    def add(self, tensor: torch.Tensor) -> None:
        self.known.append(tensor)

    def source(self, tensor: torch.Tensor) -> _Source:
        index = self._index(tensor)
        if index is not None:
            return _Source(index)
        index = self._noted_base(tensor)
        if index is None:
            index = self._storage_sharer(tensor)
        base = self.known[index]
        if (tensor.element_size() != base.element_size()
                or tensor.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()):
            raise Unbindable(f"a view of {tuple(tensor.shape)} does not view its base's storage item by item")
        view = View(tuple(tensor.shape), tensor.stride(), tensor.storage_offset() - base.storage_offset())
        return _Source(index, view, tensor.dtype)

    def _index(self, tensor: torch.Tensor) -> int | None:
        found = [index for index, known in enumerate(self.known) if tensor is known]
        if len(found) > 1:
            raise Unbindable("a tensor argument is passed as two operands: which one a replay should take is unknown")
        return found[0] if found else None

    def _noted_base(self, tensor: torch.Tensor) -> int | None:
        """The index of the known tensor a chain of noted views (`viewed`) leads from, or None."""
        while (noted := self.derived.get(id(tensor))) is not None and noted[0] is tensor:
            tensor = noted[1]
            index = self._index(tensor)
            if index is not None:
                return index
        return None

    def _storage_sharer(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage().data_ptr()
        sharing = [index for index, known in enumerate(self.known)
                   if isinstance(known, torch.Tensor) and known.untyped_storage().data_ptr() == storage]
        if len(sharing) != 1:
            raise Unbindable(f"a tensor argument of {tuple(tensor.shape)} is neither an operand, a fresh buffer "
                             "nor a view of exactly one of them")
        return sharing[0]

    def sources(self, values: tuple, pointers: bool = False) -> dict[int, _Source]:
        """{position: _Source} of each tensor among `values`. For a kernel (`pointers`), a view at the
        start of its base, of the base's dtype, is the base itself."""
        sources = {position: self.source(value) for position, value in enumerate(values)
                   if isinstance(value, torch.Tensor)}
        if pointers:
            sources = {position: _Source(source.index) if self._same_pointer(source) else source
                       for position, source in sources.items()}
        return sources

    def _same_pointer(self, source: _Source) -> bool:
        return source.view is not None and source.view.offset == 0 and source.dtype == self.known[source.index].dtype

    def result(self, result):
        """A recorded return value as _Sources (a tensor, a tuple of them) or None."""
        if isinstance(result, torch.Tensor):
            return self.source(result)
        if isinstance(result, tuple):
            return tuple(self.result(item) for item in result)
        if result is None:
            return None
        raise Unbindable(f"the launcher returned a {type(result).__name__}")


@dataclass(frozen=True)
class _Step:
    """One recorded start (call: the kernel) or fresh call (call: the make), with its positional
    values (the recorded tensors' places left None), the _Sources of its tensors, and its kwargs."""

    kind: str
    call: object
    grid: object
    values: tuple
    sources: dict
    kwargs: dict
    count: int | None = None  # how many tensors a fresh call's tuple holds (None: it makes one tensor)


class Bound:
    """A recorded launch, replayed for operands of the same signature (module docstring): its steps
    in order, as one generated function of the tensors (the operands, then what fresh calls make).
    Inside a recording (a FastCall's first call) its twin runs, which goes through codegen.launching's
    start and fresh, so that the recording notes the steps."""

    def __init__(self, operands: int, tensor_kwargs: tuple[str, ...], steps: list[_Step], result: object):
        self.tensor_kwargs = tensor_kwargs
        self._kwarg_tensors = _getter(tensor_kwargs)
        self.replay = _replay_function(operands, steps, result, recorded=False)
        self._recorded_replay = _replay_function(operands, steps, result, recorded=True)
        self.steps = steps

    def __call__(self, *args, **kwargs):
        return (self._recorded_replay if recording_now() else self.replay)(*args, *self._kwarg_tensors(kwargs))


def _replay_function(operands: int, steps: list[_Step], result, recorded: bool) -> Callable[..., object]:
    """One function of the operands (the positional tensors, then the keyword ones) running `steps` and
    returning `result` (a _Source, a tuple of them, or None), generated so that a replay pays one
    Python call per step and no argument packing: positional values and kwargs are named constants,
    tensors t<index> (operands, then what fresh calls made) or a _Source's view of one. A `recorded`
    one starts and makes through codegen.launching's start and fresh."""
    namespace: dict[str, object] = {"start": start, "fresh": fresh}
    made = operands  # the index of the next tensor a fresh call makes

    def name(value, label: str) -> str:
        namespace[label] = value
        return label

    def tensor(source: _Source, label: str) -> str:
        return f"t{source.index}" if source.view is None else f"{name(source, label)}.of(t{source.index})"

    lines = [f"def replay({''.join(f't{index}, ' for index in range(operands))}):"]
    for number, step in enumerate(steps):
        items = [tensor(step.sources[position], f"s{number}_{position}") if position in step.sources
                 else name(value, f"c{number}_{position}") for position, value in enumerate(step.values)]
        items += [f"{key}={name(value, f'k{number}_{key}')}" for key, value in step.kwargs.items()]
        call = name(step.call, f"call{number}")
        if step.kind != FRESH:
            grid = name(step.grid, f"grid{number}")
            lines.append(f"    start({call}, {grid}, {', '.join(items)})" if recorded else
                         f"    {call}[{grid}]({', '.join(items)})")
            continue
        count = 1 if step.count is None else step.count
        outputs = "".join(f"t{index}, " for index in range(made, made + count))
        made += count
        call = f"fresh({call}, {', '.join(items)})" if recorded else f"{call}({', '.join(items)})"
        lines.append(f"    {outputs[:-2] if step.count is None else outputs.rstrip() or '()'} = {call}")
    lines.append(f"    return {_result_expression(result, tensor)}")
    exec("\n".join(lines), namespace)
    return namespace["replay"]


def _result_expression(result, tensor, label: str = "r") -> str:
    if isinstance(result, _Source):
        return tensor(result, label)
    if isinstance(result, tuple):
        items = [_result_expression(item, tensor, f"{label}_{i}") for i, item in enumerate(result)]
        return "(" + "".join(item + ", " for item in items) + ")"
    return "None"


def _getter(names: tuple[str, ...]) -> Callable[[dict], tuple]:
    """A function of a dict returning the values at `names`, as a tuple."""
    if len(names) == 1:
        (name,) = names
        return lambda values: (values[name],)
    return operator.itemgetter(*names) if names else lambda values: ()


class _UnreplayedOps(TorchDispatchMode):
    """Notes each PyTorch op other than a view that a recorded call runs itself: not inside a start's
    kernel or a fresh's make (which a replay repeats), so a replay would skip it."""

    def __init__(self, recorded: Recording):
        super().__init__()
        self.recorded = recorded
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.recorded.replayed_depth and not func.is_view:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def bind(launch: Callable, args: tuple, kwargs: dict) -> tuple[Bound | None, object]:
    """(a Bound replaying launch(*args, **kwargs), or None where it cannot; what this call returned).

    The call runs for real. Its positional args are tensors (or None); a replay takes the same
    positional args and keyword tensors, the rest of its keyword args being the recorded call's."""
    operands = [*args, *(value for value in kwargs.values() if isinstance(value, torch.Tensor))]
    with recording() as recorded, _UnreplayedOps(recorded) as unreplayed:
        result = launch(*args, **kwargs)
    tensor_kwargs = tuple(name for name, value in kwargs.items() if isinstance(value, torch.Tensor))
    with contextlib.suppress(Unbindable):
        if unreplayed.found:
            raise Unbindable(f"the call ran {unreplayed.found[0]} through PyTorch itself")
        return _bound(recorded, operands, tensor_kwargs, result), result
    return None, result


def _bound(recorded: Recording, operands: list, tensor_kwargs: tuple[str, ...], result) -> Bound:
    tracer = _Tracer(operands, recorded.derived)
    steps, made_by = [], []  # made_by: (fresh step, what it made)
    for kind, call, grid, args, kwargs, made in recorded.steps:
        if _has_tensor(kwargs) or not all(key.isidentifier() for key in kwargs):
            raise Unbindable(f"a {kind} call takes a tensor, or a name that is not an identifier, by keyword")
        if any(_hides_tensor(value) for value in (*args, *kwargs.values())):
            raise Unbindable(f"a {kind} call takes a tensor inside another value: a replay would pass the recorded one")
        sources = tracer.sources(args, pointers=kind != FRESH)
        values = tuple(None if position in sources else value for position, value in enumerate(args))
        if kind != FRESH:
            steps.append(_Step(kind, call, grid, values, sources, kwargs))
            continue
        outputs = made if isinstance(made, tuple) else (made,)
        if not all(isinstance(t, torch.Tensor) for t in outputs):
            raise Unbindable("a fresh(...) call made something other than tensors")
        step = _Step(kind, call, None, values, sources, kwargs, len(outputs) if isinstance(made, tuple) else None)
        if any(step == earlier and all(map(operator.is_, outputs, made)) for earlier, made in made_by):
            continue  # a cached make (FFT tables) called again, returning the same tensors: made once on a replay
        steps.append(step)
        made_by.append((step, outputs))
        for output in outputs:
            tracer.add(output)
    return Bound(len(operands), tensor_kwargs, steps, tracer.result(result))


def _has_tensor(kwargs: dict) -> bool:
    return any(isinstance(value, torch.Tensor) for value in kwargs.values())


def _hides_tensor(value) -> bool:
    """Is `value` not a tensor but holding one: a tuple or list of them, a TMA descriptor's base?"""
    if isinstance(value, (tuple, list)):
        return any(isinstance(item, torch.Tensor) or _hides_tensor(item) for item in value)
    return isinstance(getattr(value, "base", None), torch.Tensor)

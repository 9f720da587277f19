"""Rolled scans: a scan function that TorchDynamo records as one op instead of unrolling its loop.

    compiler.register_rolled(fn)       fn computes models.mamba.selective_scan_ref's function
    fn(u, delta, A, B, C, ...)         -> flashfx::rolled_selective_scan(key, u, delta, ...)
                                       -> the pass lowers it to SelectiveScanOp

Unrolling makes capture cost grow with L: Dynamo traces every step (about 6 and 9 fx nodes per
step for models.mamba and Hugging Face, a few ms per step and layer for Hugging Face's Mamba on a
CPU core; benchmarks/compile_time.py). Once fn is registered, Dynamo traces a substitute for it
(`torch._dynamo.substitute_in_graph`) that calls one custom op. The op's fake implementation runs
fn on the first time step only, so capture costs the same at every L and output dtypes are fn's
own; its real implementation runs fn, so a call flashfx does not fuse (or another torch.compile
backend) still computes fn; its backward recomputes fn under autograd, in one opaque op too.

The substitute rolls a call whose B and C vary in time (time their last dim, as the op computes
it) and, when registered with `when`, where `when()` holds at capture (for the libraries'
functions that compiler.known_scans registers: flashfx is capturing, and rolling is on); any
other call runs a copy of fn, which Dynamo traces as written.
"""
from __future__ import annotations

import inspect
import types
from typing import Callable

import torch

from compiler.passes import PassContext
from compiler.passes.ssm_scan.frames import REAL, NoMatch, static_shape
from compiler.passes.ssm_scan.lowering import describe
from ir.graph import Graph, Node, Ref
from runtime.dispatch import _autograd_on
from ir.fused import Operand, Result, SSMLayout
from runtime.ssm_scan import SelectiveScanOp

PARAMETERS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")
LABELS = {"u": "bdl", "delta": "bdl", "A": "dn", "B": "bnl", "C": "bnl", "D": "d", "z": "bdl", "delta_bias": "d"}
_rolled: dict[int, Callable] = {}

Tensor = torch.Tensor


@torch.library.custom_op("flashfx::rolled_selective_scan", mutates_args=())
def rolled_selective_scan(key: int, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                          z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """(out, last state) of the registered function `key`."""
    out, state = _rolled[key](u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    return out.clone(), state.clone()


@rolled_selective_scan.register_fake
def _(key, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    first = [None if x is None else x[..., :1] for x in (u, delta, B, C, z)]
    out, state = _rolled[key](*first[:2], A, *first[2:4], D, first[4], delta_bias, delta_softplus, True)
    return out.new_empty(out.shape[:-1] + u.shape[-1:]), torch.empty_like(state)


@torch.library.custom_op("flashfx::rolled_selective_scan_backward", mutates_args=())
def rolled_selective_scan_backward(key: int, inputs: list[Tensor | None], delta_softplus: bool, grad_out: Tensor,
                                   grad_state: Tensor) -> list[Tensor]:
    """The gradient of each tensor in `inputs` (u, delta, A, B, C, D, z, delta_bias; None where absent),
    from the registered function `key` recomputed under autograd."""
    leaves = [x.detach().requires_grad_() for x in inputs if x is not None]
    present = iter(leaves)
    with _autograd_on():
        out, state = _rolled[key](*[None if x is None else next(present) for x in inputs], delta_softplus, True)
    grads = torch.autograd.grad((out, state), leaves, (grad_out, grad_state), allow_unused=True)
    return [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]


@rolled_selective_scan_backward.register_fake
def _(key, inputs, delta_softplus, grad_out, grad_state):
    return [torch.empty_like(x) for x in inputs if x is not None]


def _save_inputs(ctx, inputs, output) -> None:
    ctx.key, *tensors, ctx.softplus = inputs
    ctx.present = [x is not None for x in tensors]
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad_out, grad_state):
    tensors = list(ctx.saved_tensors)
    grads = iter(rolled_selective_scan_backward(ctx.key, tensors, ctx.softplus, grad_out, grad_state))
    return None, *[next(grads) if present else None for present in ctx.present], None


rolled_selective_scan.register_autograd(_backward, setup_context=_save_inputs)


def register_rolled(fn: Callable, *, when: Callable[[], bool] | None = None,
                    algorithm_parameters: tuple[str, ...] = ()) -> Callable:
    """Keep calls to `fn` rolled under capture and fuse them into the scan kernel; returns fn.

    fn must compute models.mamba.selective_scan_ref's function, its first ten parameters being
    (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) in that order, with
    time the last dim of u, delta, z, B and C (names may differ: Hugging Face's
    mamba_selective_scan qualifies). A call that gives any other parameter a value other than its
    default is traced as written (mamba_ssm's cu_seqlens changes the function), except for
    `algorithm_parameters`, which choose only how fn computes it. Registration is for the process
    and every torch.compile backend; fn itself is unchanged in eager code. Usable as a decorator.
    `when()`, if given, is asked at capture (mark it torch._dynamo.assume_constant_result to run
    it untraced): where it is false, Dynamo traces fn as written.
    """
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"flashfx: register_rolled expects a Python function, got {type(fn).__name__}")
    if id(fn) not in _rolled:
        _rolled[id(fn)] = fn
        substitute = _substitute(fn, when, frozenset(algorithm_parameters))
        torch._dynamo.substitute_in_graph(fn, skip_signature_check=True)(substitute)
    return fn


def _substitute(fn: types.FunctionType, when: Callable[[], bool] | None, free: frozenset[str]) -> Callable:
    """What Dynamo traces in place of fn: one rolled_selective_scan call, or fn as written."""
    parameters = [p for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(parameters) < len(PARAMETERS):
        raise TypeError(f"flashfx: {fn.__name__}{inspect.signature(fn)} does not take selective_scan_ref's parameters")
    names = [p.name for p in parameters]
    defaults = {p.name: p.default for p in parameters}
    others = [name for name in names[len(PARAMETERS):] if name not in free]
    as_written = _copy(fn)
    key = id(fn)

    def substitute(*args, **kwargs):
        arguments = {**defaults, **dict(zip(names, args)), **kwargs}
        u, delta, A, B, C, D, z, delta_bias, softplus, last_state = (
            arguments[name] for name in names[:len(PARAMETERS)])
        rollable = (_real_in_time(u, delta, A, B, C) and len(args) <= len(names)
                    and all(name in defaults for name in kwargs)
                    and all(_is_default(arguments[name], defaults[name]) for name in others))
        if not rollable or (when is not None and not when()):
            return as_written(*args, **kwargs)
        out, state = rolled_selective_scan(key, u, delta, A, B, C, D, z, delta_bias, bool(softplus))
        return (out, state) if last_state else out

    return substitute


def _real_in_time(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> bool:
    """Real floating tensors, with B and C varying in time (their last dim), as the op computes them."""
    return all(x.is_floating_point() for x in (u, delta, A, B, C)) and B.dim() >= 3 and C.dim() >= 3


def _is_default(value, default) -> bool:
    return value is default or (isinstance(value, (bool, int, float, str)) and type(value) is type(default)
                                and value == default)


def _copy(fn: types.FunctionType) -> types.FunctionType:
    """fn as another function object: the substitute replaces fn itself, so Dynamo traces a copy as written."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def is_rolled(node: Node) -> bool:
    target = node.call.target if node.call is not None else None
    return target in (torch.ops.flashfx.rolled_selective_scan, torch.ops.flashfx.rolled_selective_scan.default)


def fuse_rolled(graph: Graph, node: Node, context: PassContext) -> None:
    key, *values = node.call.args
    arguments = dict(zip(PARAMETERS, values))
    tensors = {name: graph.node(node.inputs[value.index]) for name, value in arguments.items() if isinstance(value, Ref)}
    for name, tensor in tensors.items():
        if tensor.type is None or tensor.type.dtype not in REAL:
            raise NoMatch(tensor, f"{name} is not a real floating tensor")
    ranks = {tensors["B"].type.rank, tensors["C"].type.rank}
    if ranks - {3, 4}:
        raise NoMatch(tensors["B"], "B and C must be (batch, dstate, seqlen) or (batch, groups, dstate, seqlen)")
    labels = {name: tuple(LABELS[name].replace("b", "bg", name in "BC" and tensor.type.rank == 4))
              for name, tensor in tensors.items()}
    (batch, dim, seqlen), dstate = static_shape(tensors["u"]), static_shape(tensors["A"])[1]
    groups = static_shape(tensors["B" if tensors["B"].type.rank == 4 else "C"])[1] if 4 in ranks else 1
    sizes = dict(b=batch, d=dim, l=seqlen, n=dstate, g=groups)
    # shapes from the operands' static sizes: the fake kernel's may hold a SymInt Dynamo later specialised
    out, state = (Result(roles, tuple(sizes[role] for role in roles), value.dtype)
                  for roles, value in zip(("bdl", "bdn"), node.value))
    layout = SSMLayout(tuple(Operand(name, labels[name]) for name in tensors), tuple(sizes.items()), out, state,
                       bool(arguments["delta_softplus"]))
    op = SelectiveScanOp([node.name], layout, mode=context.mode)
    op.prepare()
    detail = f"rolled {_rolled[key].__name__}, L={seqlen}, {describe(layout, groups)}"
    context.fuse(graph, node, op, [tensor.name for tensor in tensors.values()], [node.name], detail)

"""Rolled scans: a scan function that TorchDynamo records as one op instead of unrolling its loop.

    compiler.register_rolled(fn)       fn computes models.mamba.selective_scan_ref's function
    fn(u, delta, A, B, C, ...)         -> flashfx::rolled_selective_scan(key, u, delta, ...)
                                       -> the pass lowers it to SelectiveScanOp

Unrolling makes capture cost grow with L: Dynamo traces every step (about 6 and 9 fx nodes per
step for models.mamba and Hugging Face, 15-20 s for one layer at L 1024 on a CPU core). Once fn
is registered, Dynamo traces a substitute for it (`torch._dynamo.substitute_in_graph`) that calls
one custom op. The op's fake implementation runs fn on the first time step only, so capture
costs the same at every L and output dtypes are fn's own; its real implementation runs fn, so
a call flashfx does not fuse (or another torch.compile backend) still computes fn.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from compiler.passes import PassContext
from compiler.passes.ssm_scan.frames import REAL, NoMatch, static_shape
from compiler.passes.ssm_scan.lowering import describe
from ir.graph import Graph, Node, Ref
from runtime.ssm_scan import Operand, Result, SelectiveScanOp, SSMLayout

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


def register_rolled(fn: Callable) -> Callable:
    """Keep calls to `fn` rolled under capture and fuse them into the scan kernel; returns fn.

    fn must compute models.mamba.selective_scan_ref's function, its first ten parameters being
    (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) in that order, with
    time the last dim of u, delta, z, B and C (names may differ: Hugging Face's
    mamba_selective_scan qualifies). Registration is for the process and every torch.compile
    backend; fn itself is unchanged in eager code. Usable as a decorator.
    """
    if id(fn) not in _rolled:
        _rolled[id(fn)] = fn
        torch._dynamo.substitute_in_graph(fn, skip_signature_check=True)(_substitute(fn))
    return fn


def _substitute(fn: Callable) -> Callable:
    """What Dynamo traces in place of fn: one rolled_selective_scan call."""
    parameters = [p for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(parameters) < len(PARAMETERS):
        raise TypeError(f"flashfx: {fn.__name__}{inspect.signature(fn)} does not take selective_scan_ref's parameters")
    names = [p.name for p in parameters[:len(PARAMETERS)]]
    defaults = [None if p.default is inspect.Parameter.empty else p.default for p in parameters[:len(PARAMETERS)]]
    key = id(fn)

    def substitute(*args, **kwargs):
        values = dict(zip(names, args))
        values.update(kwargs)
        u, delta, A, B, C, D, z, delta_bias, softplus, last_state = (
            values.get(name, default) for name, default in zip(names, defaults))
        out, state = rolled_selective_scan(key, u, delta, A, B, C, D, z, delta_bias, bool(softplus))
        return (out, state) if last_state else out

    return substitute


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
    out, state = (Result(roles, tuple(value.shape), value.dtype) for roles, value in zip((("b", "d", "l"), ("b", "d", "n")), node.value))
    layout = SSMLayout(tuple(Operand(name, labels[name]) for name in tensors), tuple(sizes.items()), out, state,
                       bool(arguments["delta_softplus"]))
    op = SelectiveScanOp([node.name], layout, mode=context.mode)
    op.prepare()
    detail = f"rolled {_rolled[key].__name__}, L={seqlen}, {describe(layout, groups)}"
    context.fuse(graph, node, op, [tensor.name for tensor in tensors.values()], [node.name], detail)

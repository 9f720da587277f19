"""The ssm_scan pass's part for rolled scans (compiler.register_rolled): the one op Dynamo records
for a registered scan function, flashfx::rolled_selective_scan (runtime.rolled), becomes the fused scan.

    rolled_selective_scan(key, u, delta, A, B, C, D, z, delta_bias, delta_softplus)     time last in u,
        -> ssm_scan over the same tensors                                               delta, z, B, C
"""
from __future__ import annotations

import torch

from compiler.passes import PassContext
from compiler.passes.ssm_scan.frames import REAL, NoMatch, static_shape
from compiler.passes.ssm_scan.lowering import describe
from ir.fused import SSM_SCAN_DIMS, FusedSpec, Operand, Result, SSMLayout
from ir.graph import Graph, Node, Ref

PARAMETERS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")


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
    labels = {name: tuple(SSM_SCAN_DIMS[name].replace("b", "bg", name in "BC" and tensor.type.rank == 4))
              for name, tensor in tensors.items()}
    (batch, dim, seqlen), dstate = static_shape(tensors["u"]), static_shape(tensors["A"])[1]
    groups = static_shape(tensors["B" if tensors["B"].type.rank == 4 else "C"])[1] if 4 in ranks else 1
    sizes = dict(b=batch, d=dim, l=seqlen, n=dstate, g=groups)
    # shapes from the operands' static sizes: the fake kernel's may hold a SymInt Dynamo later specialised
    out, state = (Result(roles, tuple(sizes[role] for role in roles), value.dtype)
                  for roles, value in zip(("bdl", "bdn"), node.value))
    layout = SSMLayout(tuple(Operand(name, labels[name]) for name in tensors), tuple(sizes.items()), out, state,
                       bool(arguments["delta_softplus"]))
    detail = f"rolled {key.partition('@')[0]}, L={seqlen}, {describe(layout, groups)}"  # runtime.rolled.key_of
    context.fuse(graph, node, FusedSpec("ssm_scan", dict(layout=layout)), [tensor.name for tensor in tensors.values()],
                 [node.name], detail)

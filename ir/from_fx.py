"""Import a torch.fx GraphModule (as TorchDynamo hands it over) into the IR.

In-place writes are read first as new versions of the tensors they write (ir.mutation), so
every read after a write reads the write. Every fx node then becomes one IR node. Calls that
ir.spellings recognises get their canonical op and attrs; everything else becomes an opaque
"torch" op. Either way the node keeps its original fx call (with Refs to its inputs), so
lowering can write it back unchanged. A node whose write another node may observe records the
storages it writes (`Node.writes`): it is never dropped, and nothing reads across it.
"""
from __future__ import annotations

import torch.fx

from ir import mutation
from ir.graph import Call, Graph, Node, Ref
from ir.spellings import normalise
from ir.types import TensorType


OPAQUE = ("torch", "placeholder", "output", "get_attr")  # ops whose inputs all count as read


def from_fx(gm: torch.fx.GraphModule) -> Graph:
    mutation.functionalise(gm.graph)
    graph = Graph(owner=gm)
    for order, fx_node in enumerate(gm.graph.nodes):
        graph.add(_import_node(fx_node, float(order)))
    return graph


def _import_node(fx_node: torch.fx.Node, order: float) -> Node:
    op, attrs, canonical_inputs = _classify(fx_node)
    inputs = [arg.name for arg in canonical_inputs]
    for arg in fx_node.all_input_nodes:
        if arg.name not in inputs:
            inputs.append(arg.name)

    def to_ref(arg: torch.fx.Node) -> Ref:
        return Ref(inputs.index(arg.name))

    call = Call(
        fx_node.op,
        fx_node.target,
        torch.fx.node.map_arg(fx_node.args, to_ref),
        torch.fx.node.map_arg(fx_node.kwargs, to_ref),
    )
    value = fx_node.meta.get("example_value", fx_node.meta.get("val"))
    observable = op in OPAQUE or attrs.get("inplace") is True  # else ir.spellings read the write functionally
    written = [arg.meta.get("example_value") for arg in mutation.writes(fx_node)] if observable else []
    return Node(
        name=fx_node.name,
        op=op,
        inputs=inputs,
        attrs=attrs,
        type=TensorType.of(value),
        call=call,
        value=value,
        fx_node=fx_node,
        order=order,
        value_inputs=None if op in OPAQUE else len(canonical_inputs),
        writes=frozenset(mutation.storages(written)),
    )


def _classify(fx_node: torch.fx.Node) -> tuple[str, dict, list]:
    if fx_node.op in ("placeholder", "output", "get_attr"):
        return fx_node.op, {}, []
    normalised = normalise(fx_node)
    if normalised is not None:
        return normalised
    return "torch", {"target": _target_name(fx_node)}, []


def _target_name(fx_node: torch.fx.Node) -> str:
    target = fx_node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", repr(target))

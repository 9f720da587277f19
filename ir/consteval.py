"""Evaluate, at compile time, IR values that do not depend on the model's inputs.

Attention masks and scales are often computed inside the graph from constants
(`torch.ones(L, L).tril()`, `arange(L)[:, None] >= arange(L)`, `torch.full([], sqrt(d))`)
or from module buffers (nanoGPT's registered `bias` tril). Passes evaluate them to decide
what the value *is* (a scalar, a causal mask, no mask at all).

`pinned` maps placeholder names to the real tensors they hold now (module buffers): a
result that depends on them is only valid while they are unchanged, so callers that rely
on it must guard on them at run time (see runtime.guards). A value whose computation writes
into a placeholder's storage is not evaluated (that would change the model's state).
"""
from __future__ import annotations

import torch

from ir.graph import Call, Graph, Node, Ref, map_refs
from ir.mutation import storages
from ir.to_fx import LOWERINGS

MAX_ELEMENTS = 1 << 26


def evaluate(graph: Graph, node: Node, pinned: dict[str, torch.Tensor]):
    """The real value of `node`, or None when it depends on a non-pinned input or is too big."""
    needed = graph.ancestors(node.name) | {node.name}
    inputs = storages([graph.node(name).value for name in needed if graph.node(name).op == "placeholder"])
    if any(graph.node(name).writes & inputs for name in needed):
        return None  # evaluating it would write into the model's own state
    for name in needed:
        ancestor = graph.node(name)
        if ancestor.op == "placeholder" and name not in pinned:
            return None
        if ancestor.type is not None and _elements(ancestor) > MAX_ELEMENTS:
            return None
    values: dict[str, object] = {}
    with torch.no_grad():
        for current in graph:
            if current.name in needed:
                values[current.name] = _run(graph, current, values, pinned)
    return values[node.name]


def pinned_dependencies(graph: Graph, node: Node, pinned: dict[str, torch.Tensor]) -> list[str]:
    """The pinned placeholders that `node`'s value depends on."""
    return sorted(name for name in graph.ancestors(node.name) | {node.name} if name in pinned)


def _elements(node: Node) -> int:
    shape = node.type.static_shape()
    if shape is None:
        return MAX_ELEMENTS + 1
    count = 1
    for size in shape:
        count *= size
    return count


def _run(graph: Graph, node: Node, values: dict, pinned: dict):
    if node.op == "placeholder":
        return pinned[node.name]
    call = node.call if node.call is not None else LOWERINGS[node.op](node)
    def resolve(ref: Ref):
        return values[node.inputs[ref.index]]

    return _execute(graph, call, map_refs(call.args, resolve), map_refs(call.kwargs, resolve))


def _execute(graph: Graph, call: Call, args, kwargs):
    if call.kind == "call_function":
        return call.target(*args, **kwargs)
    if call.kind == "call_method":
        return getattr(args[0], call.target)(*args[1:], **kwargs)
    if call.kind == "get_attr":
        return _attribute(graph.owner, call.target)
    if call.kind == "call_module":
        return graph.owner.get_submodule(call.target)(*args, **kwargs)
    raise ValueError(f"cannot evaluate a {call.kind} node")


def _attribute(owner: torch.nn.Module, target: str):
    value = owner
    for part in target.split("."):
        value = getattr(value, part)
    return value

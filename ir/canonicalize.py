"""Canonicalisation: rewrite the IR so one pattern covers many spellings.

    x.to(x.dtype), x.detach(), eval-mode dropout(x)    -> x  (they return x itself;
                                                        contiguous/clone stay: strides matter)
    x / c                                               -> x * (1/c)       (attrs only)
    einsum("...ic,...cj->...ij", a, b) (any index order) -> permute + matmul (+ permute)
    addmm/baddbmm(c, a, b, beta, alpha)                  -> (a @ b) * alpha + c * beta  (factors of 1 and
                                                           terms times 0 dropped)
    reshape(expand(reshape(x, [b,h,1,l,d]), [b,h,n,l,d]), [b,h*n,l,d])
    and repeat_interleave(x, n, dim=1)                  -> repeat_kv(x, n)    (GQA/MQA)

Nodes created here have no fx call; ir.to_fx lowers them through its op table. Their
fake values are computed by running the canonical torch op on the inputs' fake values.
"""
from __future__ import annotations

import torch

from ir.graph import Graph, Node
from ir.types import TensorType


def canonicalize(graph: Graph) -> Graph:
    for node in list(graph):
        if node.name not in graph:
            continue
        if (node.op == "identity" and node.attrs["alias"]) or (node.op == "dropout" and _is_noop_dropout(node)):
            graph.replace_uses(node.name, node.inputs[0])
        elif node.op == "div" and node.attrs["scalar"] not in (None, 0) and not node.attrs["scalar_first"]:
            node.op, node.attrs = "mul", {"scalar": 1.0 / node.attrs["scalar"], "scalar_first": False}
        elif node.op == "einsum":
            _rewrite_einsum(graph, node)
        elif node.op == "addmm":
            _rewrite_addmm(graph, node)
        elif node.op in ("reshape", "repeat_interleave"):
            _rewrite_repeat_kv(graph, node)
    return graph


def _is_noop_dropout(node: Node) -> bool:
    return not node.attrs["training"] or node.attrs["p"] == 0


def _new_node(graph: Graph, anchor: Node, op: str, inputs: list[str], attrs: dict, value) -> Node:
    node = Node(
        name=graph.fresh_name(f"{anchor.name}_{op}"),
        op=op,
        inputs=inputs,
        attrs=attrs,
        type=TensorType.of(value),
        value=value,
        order=anchor.order,
    )
    return graph.add(node)


def _permute(graph: Graph, anchor: Node, source: Node, perm: tuple[int, ...]) -> Node:
    if perm == tuple(range(len(perm))):
        return source
    return _new_node(graph, anchor, "permute", [source.name], {"perm": perm}, torch.permute(source.value, perm))


# -- einsum ------------------------------------------------------------------------
def _rewrite_einsum(graph: Graph, node: Node) -> None:
    """Batched-matmul einsums become matmul; anything else stays an einsum."""
    plan = _einsum_plan(node.attrs["equation"], len(node.inputs))
    if plan is None:
        return
    perm_a, perm_b, perm_out = plan
    a, b = (graph.node(name) for name in node.inputs)
    a_perm = _permute(graph, node, a, perm_a)
    b_perm = _permute(graph, node, b, perm_b)
    product = _new_node(graph, node, "matmul", [a_perm.name, b_perm.name], {}, torch.matmul(a_perm.value, b_perm.value))
    result = _permute(graph, node, product, perm_out)
    graph.replace_uses(node.name, result.name)


def _einsum_plan(equation: str, operands: int):
    """For 'batch+i+c, batch+c+j -> out' (any order), the permutations that make it a matmul."""
    if operands != 2 or "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    contracted = [c for c in a if c in b and c not in out]
    batch = [c for c in out if c in a and c in b]
    rows = [c for c in a if c not in b]
    cols = [c for c in b if c not in a]
    if len(contracted) != 1 or len(rows) != 1 or len(cols) != 1 or set(out) != set(batch + rows + cols):
        return None
    (c,), (i,), (j,) = contracted, rows, cols
    perm_a = tuple(a.index(x) for x in batch + [i, c])
    perm_b = tuple(b.index(x) for x in batch + [c, j])
    product = batch + [i, j]
    perm_out = tuple(product.index(x) for x in out)
    return perm_a, perm_b, perm_out


# -- addmm -------------------------------------------------------------------------
def _rewrite_addmm(graph: Graph, node: Node) -> None:
    added, a, b = (graph.node(name) for name in node.inputs)
    result = _new_node(graph, node, "matmul", [a.name, b.name], {}, torch.matmul(a.value, b.value))
    result = _scaled(graph, node, result, node.attrs["alpha"])
    if node.attrs["beta"] != 0:
        added = _scaled(graph, node, added, node.attrs["beta"])
        result = _new_node(graph, node, "add", [result.name, added.name], {"scalar": None, "scalar_first": False},
                           torch.add(result.value, added.value))
    graph.replace_uses(node.name, result.name)


def _scaled(graph: Graph, anchor: Node, source: Node, factor) -> Node:
    if factor == 1:
        return source
    return _new_node(graph, anchor, "mul", [source.name], {"scalar": factor, "scalar_first": False},
                     torch.mul(source.value, factor))


# -- repeat_kv -----------------------------------------------------------------------
def _rewrite_repeat_kv(graph: Graph, node: Node) -> None:
    found = _repeat_kv_source(graph, node)
    if found is None:
        return
    source, repeats = found
    value = torch.repeat_interleave(source.value, repeats, dim=1)
    repeated = _new_node(graph, node, "repeat_kv", [source.name], {"repeats": repeats}, value)
    graph.replace_uses(node.name, repeated.name)


def _repeat_kv_source(graph: Graph, node: Node) -> tuple[Node, int] | None:
    """(kv tensor, repeats) when `node` repeats each head of a (b, h, l, d) tensor n times."""
    if node.type is None or node.type.rank != 4:
        return None
    if node.op == "repeat_interleave":
        source = graph.node(node.inputs[0])
        return (source, node.attrs["repeats"]) if node.attrs["dim"] == 1 and source.type.rank == 4 else None
    expanded = graph.node(node.inputs[0])
    if expanded.op != "expand" or expanded.type.rank != 5:
        return None
    unsqueezed = graph.node(expanded.inputs[0])
    if unsqueezed.op != "reshape" or unsqueezed.type.rank != 5:
        return None
    source = graph.node(unsqueezed.inputs[0])
    b, h, l, d = source.type.shape if source.type.rank == 4 else (None,) * 4
    if h is None or tuple(unsqueezed.type.shape) != (b, h, 1, l, d):
        return None
    n = expanded.type.shape[2]
    if tuple(expanded.type.shape) != (b, h, n, l, d) or tuple(node.type.shape) != (b, h * n, l, d):
        return None
    return source, int(n)

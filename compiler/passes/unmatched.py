"""The last pass: a family's anchor that nothing fused, and no pass explained, gets a near-miss.

Each family's pass reports the candidates it starts on and where they broke. A graph can still
hold the core of a family that no pass took up as a candidate (a form no rule starts from); then
report() would say nothing. This pass looks for each family's anchor that is still in the graph:

    attention    softmax(s) read by a matmul, s made from a matmul (through scales, masks, casts)
    long_conv    irfft / ifft of a product of spectra (each made by an rfft / fft)
    ssm_scan     exp(x) * h + b: a decay times a carried value plus an update (one recurrence step)
    ssd_scan     segsum(a): the segment sums of a decay, Mamba-2's chunked SSD mask
    sparse_mlp   linear(act(linear(x)) (* | where | index) selection): two projections with a
                 selection of neurons between them

and, when that family's pass reported nothing about this graph, records one near-miss naming
the anchor and the form it has, so report() is never silent about such a graph. It runs after
dead code is gone, so what fused is no longer there.
"""
from __future__ import annotations

from compiler.passes import PassContext
from ir.graph import Graph, Node

THROUGH = {"cast", "identity", "mul", "div", "add", "sub", "where", "reshape", "permute", "expand", "dropout",
           "tanh"}  # ops a family's core may sit behind
ACTIVATIONS = {"relu", "gelu", "silu", "sigmoid", "tanh"}
SELECTIONS = {"mul", "where", "index"}


def run(graph: Graph, context: PassContext) -> None:
    reported = {miss.pattern for miss in context.report.near_misses if miss.graph == context.graph_index}
    for node in graph:
        for pattern, describe in ANCHORS:
            form = describe(graph, node)
            if form is not None and pattern not in reported:
                context.near_miss(pattern, node, node.name, f"{form}, but no {pattern} rule matched this form")
                reported.add(pattern)


def _behind(graph: Graph, node: Node, ops: set[str], depth: int = 6) -> bool:
    """Is a node with an op in `ops` among node and its inputs' chains, stepping through THROUGH ops?"""
    frontier = [node]
    for _ in range(depth):
        if any(current.op in ops for current in frontier):
            return True
        frontier = [graph.node(name) for current in frontier if current.op in THROUGH for name in current.inputs]
    return False


def _attention(graph: Graph, node: Node) -> str | None:
    if node.op != "softmax" or not _behind(graph, graph.node(node.inputs[0]), {"matmul", "sdpa"}):
        return None
    readers = graph.users(node.name)
    while readers and readers[0].op in ("cast", "identity", "dropout") and len(readers) == 1:
        readers = graph.users(readers[0].name)
    return "softmax over matmul scores, read by a matmul" if any(r.op == "matmul" for r in readers) else None


def _long_conv(graph: Graph, node: Node) -> str | None:
    if node.op not in ("irfft", "ifft"):
        return None
    product = graph.node(node.inputs[0])
    spectra = [graph.node(name) for name in product.inputs] if product.op in ("mul", "einsum", "matmul") else []
    if len(spectra) == 2 and all(_behind(graph, spectrum, {"rfft", "fft"}) for spectrum in spectra):
        return f"{node.op} of a product of two spectra"
    return None


def _ssm_scan(graph: Graph, node: Node) -> str | None:
    if node.op != "add" or len(node.inputs) != 2:
        return None
    for decayed_name, update_name in (node.inputs, node.inputs[::-1]):
        decayed, update = graph.node(decayed_name), graph.node(update_name)
        if (decayed.op == "mul" and len(decayed.inputs) == 2 and update.op in ("mul", "einsum", "matmul")
                and node.type is not None and node.type.rank >= 3
                and any(_behind(graph, graph.node(factor), {"exp"}, depth=3) for factor in decayed.inputs)):
            return "a recurrence step exp(Δ A) * h + update"
    return None


def _ssd_scan(graph: Graph, node: Node) -> str | None:
    return "segment sums of a decay (the decay mask of Mamba-2's chunked SSD)" if node.op == "segsum" else None


def _sparse_mlp(graph: Graph, node: Node) -> str | None:
    if node.op not in ("linear", "matmul"):
        return None
    selected = graph.node(node.inputs[0])
    if selected.op not in SELECTIONS:
        return None
    kinds = [_factor_kind(graph, factor) for factor in _factors(graph, selected)]
    gathered_or_masked = selected.op != "mul" or "other" in kinds
    if kinds.count("activated") == 1 and kinds.count("projection") <= 1 and gathered_or_masked:
        return f"two projections with a {selected.op} selecting neurons between them"
    return None  # a dense MLP, gated (down(act(gate(x)) * up(x))) or not


def _factors(graph: Graph, node: Node) -> list[Node]:
    """The leaves of a chain of muls; the tensors a where or an index selects from."""
    if node.op in ("where", "index"):
        return [graph.node(name) for name in node.inputs]
    if node.op != "mul":
        return [node]
    return [leaf for name in node.inputs for leaf in _factors(graph, graph.node(name))]


def _factor_kind(graph: Graph, node: Node) -> str:
    if node.op in ACTIVATIONS and _behind(graph, graph.node(node.inputs[0]), {"linear", "matmul"}, 2):
        return "activated"
    return "projection" if node.op in ("linear", "matmul") else "other"


ANCHORS = (("attention", _attention), ("long_conv", _long_conv), ("ssm_scan", _ssm_scan),
           ("ssd_scan", _ssd_scan), ("sparse_mlp", _sparse_mlp))

"""The last pass: a family's anchor that nothing fused, and no pass explained, gets a near-miss.

Each family's pass reports the candidates it starts on and where they broke. A graph can still
hold the core of a family that no pass took up as a candidate (a form no rule starts from); then
report() would say nothing. This pass looks for each family's anchor that is still in the graph:

    attention    softmax(s) read by a matmul, s made from a matmul (through scales, masks, casts);
                 the softmax may be written out without the row max, exp(s) / sum(exp(s)), and the
                 scores and weights may pass through slices, pads and in-place writes (Longformer's
                 banded attention); or a call of attention no pass reads (flex_attention)
    long_conv    irfft / ifft of a product of spectra (each made by an rfft / fft), or an inverse
                 transform ir.spellings leaves opaque (irfftn, ifftn...) of a product
    ssm_scan     exp(x) * h + b: a decay times a carried value plus an update (one recurrence step,
                 a decode step), or two steps h = a * h + b in a row with a and b not read from h
                 (a Python loop's linear recurrence, whatever its decay: sigmoid, complex...), or a
                 running sum (cumsum, logcumsumexp) of what a running sum decays: the recurrence in
                 parallel form (mamba-tiny's cumsum of exp(cumsum(Δ A)), heinsen_sequence's log space)
    ssd_scan     segsum(a): the segment sums of a decay, Mamba-2's chunked SSD mask; or exp(cs[..., :, None]
                 - cs[..., None, :]) of one cumsum cs (the mask applied after exp: mamba_ssm's
                 chunk_scan_ref and state_passing_ref)
    sparse_mlp   linear(act(linear(x)) (* | where | index) selection): two projections with a
                 selection of neurons between them (gated too: a where keeping act(gate(x)) * up(x))

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
INVERSE_TRANSFORMS = {"irfft", "ifft", "fft_irfftn", "fft_ifftn", "fft_irfft2", "fft_ifft2"}
FORWARD_TRANSFORMS = {"rfft", "fft"}
IN_PLACE = {"add": ("add_", "iadd"), "mul": ("mul_", "imul")}  # in-place spellings of a binary op
SELECTIONS = {"mul", "where", "index"}
RUNNING_SUMS = {"cumsum", "logcumsumexp"}
SCAN_THROUGH = {"flip", "log", "exp", "real"}  # ops between the running sums of a parallel-form scan
WINDOW_THROUGH = {"assign", "iadd", "getitem", "slice", "pad", "flip", "cat", "where"}  # a window's blocks
WINDOW_DEPTH = 12
ATTENTION_CALLS = {  # attention as one call that no pass reads: what it is
    "flex_attention": "flex_attention, a higher-order op whose score_mod and block_mask are subgraphs",
}


def run(graph: Graph, context: PassContext) -> None:
    reported = {miss.pattern for miss in context.report.near_misses if miss.graph == context.graph_index}
    for node in graph:
        for pattern, describe in ANCHORS:
            form = describe(graph, node) if pattern not in reported else None
            if form is not None:
                context.near_miss(pattern, node, node.name, f"{form}, but no {pattern} rule matched this form")
                reported.add(pattern)


def _behind(graph: Graph, node: Node, ops: set[str], depth: int = 6, through: set[str] = frozenset()) -> bool:
    """Is a node with an op in `ops` among node and its inputs' chains, stepping through THROUGH ops
    (and opaque calls named in `through`)?"""
    return _reaches([node], ops, depth, through, lambda current: [graph.node(name) for name in current.inputs])


def _reaches(start: list[Node], ops: set[str], depth: int, through: set[str], neighbours) -> bool:
    """Is a node with an op in `ops` within `depth` steps of `start`, each step from a THROUGH op (or
    an opaque call named in `through`) to its `neighbours`? (Each node visited once per step.)"""
    frontier = start
    for _ in range(depth):
        if any(current.op in ops for current in frontier):
            return True
        frontier = list(dict.fromkeys(neighbour for current in frontier
                                      if current.op in THROUGH or _op(current) in through
                                      for neighbour in neighbours(current)))
    return False


def _attention(graph: Graph, node: Node) -> str | None:
    if node.op == "torch" and node.attrs["target"] in ATTENTION_CALLS:
        return ATTENTION_CALLS[node.attrs["target"]]
    scores = _softmax_input(graph, node)
    if scores is None:
        return None
    if not _behind(graph, scores, {"matmul", "sdpa"}):
        return _windowed_attention(graph, node, scores)
    readers = graph.users(node.name)
    while readers and readers[0].op in ("cast", "identity", "dropout", "permute", "reshape") and len(readers) == 1:
        readers = graph.users(readers[0].name)
    if not any(r.op == "matmul" for r in readers):
        return None
    if node.op == "softmax":
        return "softmax over matmul scores, read by a matmul"
    return "a softmax written out without the row max, exp(s) / sum(exp(s)), over matmul scores, read by a matmul"


def _windowed_attention(graph: Graph, node: Node, scores: Node) -> str | None:
    """Scores assembled from matmul blocks through slices, pads and in-place writes, whose weights
    reach a matmul the same way (Longformer's banded sliding-chunk attention)."""
    def users(current: Node) -> list[Node]:
        return graph.users(current.name)

    if not (_behind(graph, scores, {"matmul"}, depth=WINDOW_DEPTH, through=WINDOW_THROUGH)
            and _reaches(users(node), {"matmul"}, WINDOW_DEPTH, WINDOW_THROUGH, users)):
        return None
    return ("softmax over scores assembled from matmul blocks through slices, pads or in-place writes (banded "
            "or windowed attention), its weights read by a matmul the same way")


def _softmax_input(graph: Graph, node: Node) -> Node | None:
    """s for softmax(s), or for exp(s) / sum(exp(s)) (written out without the row max, which
    ir.canonicalize leaves: eager overflows where softmax does not)."""
    if node.op == "softmax":
        return graph.node(node.inputs[0])
    if node.op != "div" or len(node.inputs) != 2:
        return None
    exp, total = (graph.node(name) for name in node.inputs)
    if exp.op == "exp" and total.op == "sum" and total.inputs == [exp.name]:
        return graph.node(exp.inputs[0])
    return None


def _long_conv(graph: Graph, node: Node) -> str | None:
    inverse = node.op if node.op in ("irfft", "ifft") else node.attrs["target"] if node.op == "torch" else None
    if inverse not in INVERSE_TRANSFORMS:
        return None
    product = graph.node(node.inputs[0])
    spectra = [graph.node(name) for name in product.inputs] if product.op in ("mul", "einsum", "matmul") else []
    if len(spectra) == 2 and all(_behind(graph, spectrum, FORWARD_TRANSFORMS) for spectrum in spectra):
        return f"{inverse} of a product of two spectra"
    return None


def _ssm_scan(graph: Graph, node: Node) -> str | None:
    looped = _recurrence_steps(graph, node, lambda decay, carried: _shaped_like_a_step(graph, carried))
    if any(_recurrence_steps(graph, carried) for _, carried in looped):
        return "a linear recurrence h = a * h + b unrolled from a loop (two steps in a row)"
    if node.type is not None and node.type.rank >= 3 and _recurrence_steps(
            graph, node, lambda decay, carried: _behind(graph, decay, {"exp"}, depth=3)):
        return "a recurrence step exp(Δ A) * h + update"
    if _op(node) in RUNNING_SUMS and _behind(graph, graph.node(node.inputs[0]), {"cumsum"}, through=SCAN_THROUGH):
        return f"a {_op(node)} over a decayed running sum (a linear recurrence in parallel form)"
    return None


def _op(node: Node) -> str:
    return node.attrs["target"] if node.op == "torch" else node.op



def _recurrence_steps(graph: Graph, node: Node, plausible=lambda decay, carried: True) -> list[tuple[Node, Node]]:
    """Each way to read `node` as a * h + b with neither a nor b computed from h (a linear step), as
    (a, h); in place too (h.mul_(a).add_(b), a decode step writing the caller's state). Only the
    readings `plausible` (a cheap test) accepts are checked for independence, a walk over the graph."""
    steps, terms = [], _binary_inputs(node, "add")
    for decayed_name, update_name in (terms, terms[::-1]) if terms else ():
        factors = _binary_inputs(graph.node(decayed_name), "mul")
        for decay_name, carried_name in (factors, factors[::-1]) if factors else ():
            decay, carried = graph.node(decay_name), graph.node(carried_name)
            if plausible(decay, carried) and not any(_computed_from(graph, term, carried)
                                                     for term in (decay, graph.node(update_name))):
                steps.append((decay, carried))
    return steps


def _shaped_like_a_step(graph: Graph, node: Node) -> bool:
    """Is `node` an add with a mul among its inputs (what a * h + b looks like, unchecked)?"""
    return any(_binary_inputs(graph.node(name), "mul") for name in _binary_inputs(node, "add") or ())


def _binary_inputs(node: Node, op: str) -> list[str] | None:
    """The two tensor inputs of `node` when it is op(a, b), functional or in place (a.op_(b), a op= b)."""
    if len(node.inputs) != 2:
        return None
    if node.op == op and node.attrs.get("scalar") is None:
        return node.inputs
    return node.inputs if node.op == "torch" and node.attrs["target"] in IN_PLACE[op] else None


def _computed_from(graph: Graph, node: Node, source: Node) -> bool:
    """Is `node` `source` or computed from it? Walks inputs back to nodes made before `source` only."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current is source:
            return True
        if current.name not in seen and current.order >= source.order:
            seen.add(current.name)
            frontier.extend(graph.node(name) for name in current.inputs)
    return False


def _ssd_scan(graph: Graph, node: Node) -> str | None:
    if node.op == "segsum":
        return "segment sums of a decay (the decay mask of Mamba-2's chunked SSD)"
    difference = graph.node(node.inputs[0]) if node.op == "exp" else None
    if difference is None or difference.op != "sub" or len(difference.inputs) != 2:
        return None
    sources = {_under_reshapes(graph, graph.node(name)) for name in difference.inputs}
    if len(sources) == 1 and sources.pop().op == "cumsum" and difference.inputs[0] != difference.inputs[1]:
        return "exp of the pairwise differences of a cumsum (Mamba-2's decay between steps)"
    return None


def _under_reshapes(graph: Graph, node: Node) -> Node:
    while node.op == "reshape":
        node = graph.node(node.inputs[0])
    return node


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
    """The leaves of a chain of muls; the tensors a where or an index selects from (a product among
    them split into its factors: a gated MLP's act(gate(x)) * up(x))."""
    if node.op not in ("where", "index", "mul"):
        return [node]
    return [leaf for name in node.inputs for leaf in _factors(graph, graph.node(name))]


def _factor_kind(graph: Graph, node: Node) -> str:
    if node.op in ACTIVATIONS and _behind(graph, graph.node(node.inputs[0]), {"linear", "matmul"}, 2):
        return "activated"
    return "projection" if node.op in ("linear", "matmul") else "other"


ANCHORS = (("attention", _attention), ("long_conv", _long_conv), ("ssm_scan", _ssm_scan),
           ("ssd_scan", _ssd_scan), ("sparse_mlp", _sparse_mlp))

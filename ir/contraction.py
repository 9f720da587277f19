"""Products and sums read as one contraction: an einsum over any number of factors.

    contraction(graph, root) -> Contraction(out, factors, scale, nodes)

reads root as  root[out...] = scale * Σ_{summed labels} Π_k factor_k[labels_k...]  by looking
through, where nothing else reads them (root itself always):

    einsum (2 operands after canonicalisation; any arity)   matmul (batched, broadcast, 1-D sides)
    mul of two tensors (broadcast), mul by a number (scale)  sum over dims (keepdim or not)
    permute, expand, reshapes that add or drop unit dims     casts and copies between float dtypes

Each dim of each factor gets a label (a unit dim too, so views keep track of it); a unit dim
broadcast against a larger one gets a label of its own. Labels in factors but not in `out` are
summed, labels in `out` that no factor has are broadcast; `active` leaves out unit dims, which
neither sum nor broadcast anything. Labels are fresh per call, so compare two contractions
through the nodes they share, not through label names. So one analysis reads
C B^T * L then @ X (Hugging Face), einsum("bclhn,bcshn,bhcls,bcshp->bclhp", ...) (mamba_ssm) and
(C[..., None, :] * B).sum(-1) alike.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ir.graph import Graph, Node

Labels = tuple  # per dim: a label (str)
KERNEL_FLOATS = ("float16", "bfloat16", "float32")  # casts to these are looked through (not to float64)


@dataclass(frozen=True)
class Factor:
    node: Node
    labels: Labels


@dataclass
class Contraction:
    out: Labels
    factors: list[Factor] = field(default_factory=list)
    scale: float = 1.0
    nodes: list[str] = field(default_factory=list)  # looked through, outermost last

    @property
    def summed(self) -> set[str]:
        return {label for factor in self.factors for label in active(factor)} - set(self.out)


def active(factor: Factor) -> tuple[str, ...]:
    """The labels of factor's dims of size > 1."""
    return tuple(label for label, size in zip(factor.labels, _shape(factor.node)) if size != 1)


def contraction(graph: Graph, root: Node, keep: frozenset = frozenset(), products: bool = True) -> Contraction:
    """root as a contraction of the factors under it (see the module docstring); nodes named in
    `keep` are factors even when only the contraction reads them. Without `products`, only views
    and casts are looked through: the one factor is the tensor under them."""
    names = (f"i{k}" for k in itertools.count())
    result = Contraction(out=_fresh(root, names))
    pending = [(root, result.out, True)]
    while pending:
        node, labels, is_root = pending.pop()
        private = is_root or (len(graph.nx.succ[node.name]) == 1 and node.name not in keep)
        expanded = _expand(graph, node, labels, names, products) if private else None
        if expanded is None:
            result.factors.append(Factor(node, labels))
            continue
        parts, scale = expanded
        result.scale *= scale
        result.nodes.append(node.name)
        pending.extend((source, source_labels, False) for source, source_labels in reversed(parts))
    result.nodes.reverse()
    return result


def _shape(node: Node) -> tuple[int, ...] | None:
    return node.type.static_shape() if node.type is not None else None


def _fresh(node: Node, names) -> Labels:
    return tuple(next(names) for _ in _shape(node))


def _expand(graph: Graph, node: Node, labels: Labels, names, products: bool = True):
    """([(input, its labels)], scale) for a node the contraction looks through, else None."""
    inputs = [graph.node(name) for name in node.inputs]
    if node.type is None or _shape(node) is None or any(_shape(x) is None for x in inputs):
        return None
    if node.op in ("cast", "identity") and _is_float(node, KERNEL_FLOATS) and _is_float(inputs[0]):
        return [(inputs[0], labels)], 1.0
    if node.op == "mul" and node.attrs["scalar"] is not None and products:
        return [(inputs[0], labels)], node.attrs["scalar"]
    if not products and node.op in PRODUCTS:
        return None
    rule = EXPANSIONS.get(node.op)
    parts = rule(node, inputs, labels, names) if rule is not None else None
    return None if parts is None else (parts, 1.0)


def _is_float(node: Node, dtypes=KERNEL_FLOATS + ("float64",)) -> bool:
    return str(node.type.dtype).removeprefix("torch.") in dtypes


def _broadcast(source: Node, result: Node, labels: Labels, names) -> Labels | None:
    """Labels of `source` broadcast into `result` (whose dims carry `labels`), or None."""
    source_shape, result_shape = _shape(source), _shape(result)
    offset = len(result_shape) - len(source_shape)
    if offset < 0 or any(size not in (1, result_shape[k + offset]) for k, size in enumerate(source_shape)):
        return None
    return tuple(next(names) if size != result_shape[k + offset] else labels[k + offset]
                 for k, size in enumerate(source_shape))


def _mul(node, inputs, labels, names):
    if len(inputs) != 2:
        return None
    parts = [(x, _broadcast(x, node, labels, names)) for x in inputs]
    return None if any(part is None for _, part in parts) else parts


def _permute(node, inputs, labels, names):
    permuted = [None] * len(labels)
    for k, source_dim in enumerate(node.attrs["perm"]):
        permuted[source_dim] = labels[k]
    return [(inputs[0], tuple(permuted))]


def _expand_op(node, inputs, labels, names):
    source = _broadcast(inputs[0], node, labels, names)
    return None if source is None else [(inputs[0], source)]


def _reshape(node, inputs, labels, names):
    """Only reshapes that add or drop unit dims (the others regroup dims); a unit dim keeps its
    label when the units on both sides pair up in order between the same sized dims."""
    source_shape, result_shape = _shape(inputs[0]), _shape(node)
    if [size for size in source_shape if size != 1] != [size for size in result_shape if size != 1]:
        return None
    source_groups, result_groups = _unit_runs(source_shape), _unit_runs(result_shape)
    source = [next(names) for _ in source_shape]
    for (source_dims, result_dims) in zip(source_groups, result_groups):
        for k_source, k_result in zip(source_dims, result_dims):
            source[k_source] = labels[k_result]
    return [(inputs[0], tuple(source))]


def _unit_runs(shape: tuple[int, ...]) -> list[list[int]]:
    """The dims of `shape` in runs: each sized dim on its own, the unit dims before it together."""
    runs, units = [], []
    for k, size in enumerate(shape):
        if size == 1:
            units.append(k)
        else:
            runs += [units, [k]]
            units = []
    return runs + [units]


def _sum(node, inputs, labels, names):
    if node.attrs["dtype"] is not None:
        return None
    dims, rank = node.attrs["dim"], inputs[0].type.rank
    kept = iter(labels) if not node.attrs["keepdim"] else None
    return [(inputs[0], tuple(next(names) if k in dims else (labels[k] if kept is None else next(kept))
                              for k in range(rank)))]


def _einsum(node, inputs, labels, names):
    equation = node.attrs["equation"]
    terms, _, out = equation.partition("->")
    terms = terms.split(",")
    if len(terms) != len(inputs) or any(len(term) != x.type.rank for term, x in zip(terms, inputs)):
        return None
    letters = dict(zip(out, labels))
    for letter in "".join(terms):
        if letter not in letters:
            letters[letter] = next(names)
    return [(x, tuple(letters[letter] for letter in term)) for term, x in zip(terms, inputs)]


def _matmul(node, inputs, labels, names):
    """a (..., m, k) @ b (..., k, n); a 1-D side has no m (or n) dim; batch dims broadcast."""
    if len(inputs) != 2:
        return None
    a, b = inputs
    reduced = next(names)
    a_rank, b_rank = a.type.rank, b.type.rank
    batch = labels[:len(labels) - (a_rank > 1) - (b_rank > 1)]
    rows = (labels[len(batch)],) if a_rank > 1 else ()
    cols = (labels[-1],) if b_rank > 1 else ()
    a_batch, b_batch = (_batch(x, node, batch, rank - 1 - extra, names)
                        for x, rank, extra in ((a, a_rank, len(rows)), (b, b_rank, len(cols))))
    return [(a, a_batch + rows + (reduced,)), (b, b_batch + (reduced,) + cols)]


def _batch(operand: Node, result: Node, batch: Labels, rank: int, names) -> Labels:
    """The labels of an operand's `rank` batch dims, right-aligned with the result's, broadcast ones fresh."""
    result_shape = _shape(result)[:len(batch)]
    sizes = _shape(operand)[:rank]
    aligned = range(len(batch) - rank, len(batch))
    return tuple(batch[k] if size == result_shape[k] else next(names) for k, size in zip(aligned, sizes))


PRODUCTS = ("mul", "sum", "einsum", "matmul")
EXPANSIONS = {"mul": _mul, "permute": _permute, "expand": _expand_op, "reshape": _reshape, "sum": _sum,
              "einsum": _einsum, "matmul": _matmul}

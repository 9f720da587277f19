"""Products and sums read as one contraction: an einsum over any number of factors.

    contraction(graph, root) -> Contraction(out, factors, nodes)

reads root as  root[out...] = Σ_{summed labels} Π_k factor_k[labels_k...]  by looking through,
where nothing else reads them (root itself always):

    einsum (2 operands after canonicalisation; any arity)   matmul (batched, broadcast, 1-D sides)
    mul of two tensors (broadcast)                           sum over dims (keepdim or not)
    permute, expand, casts and copies between float dtypes    reshapes that add or drop unit dims,
    selects of a unit dim (x[..., 0] dropping it)            merge adjacent dims or split one

Each dim of each factor gets a label (a unit dim too, so views keep track of it); a unit dim
broadcast against a larger one gets a label of its own. Labels in factors but not in `out` are
summed, labels in `out` that no factor has are broadcast; `active` leaves out unit dims, which
neither sum nor broadcast anything. Labels are fresh per call, so compare two contractions
through the nodes they share, not through label names. So one analysis reads
C B^T * L then @ X (Hugging Face), einsum("bclhn,bcshn,bhcls,bcshp->bclhp", ...) (mamba_ssm) and
(C[..., None, :] * B).sum(-1) alike. A product by a number is a factor like any other node: a
caller that binds factors to roles sees it and stops, so no scale is ever dropped.
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
    nodes: list[str] = field(default_factory=list)  # looked through, outermost last

    @property
    def summed(self) -> set[str]:
        return {label for factor in self.factors for label in active(factor)} - set(self.out)


def active(factor: Factor) -> tuple[str, ...]:
    """The labels of factor's dims of size > 1."""
    return tuple(label for label, size in zip(factor.labels, _shape(factor.node)) if size != 1)


def contraction(graph: Graph, root: Node, keep: frozenset = frozenset(), products: bool = True,
                regroups: bool = True) -> Contraction:
    """root as a contraction of the factors under it (see the module docstring); nodes named in
    `keep` are factors even when only the contraction reads them. Without `products`, only views
    and casts are looked through: the one factor is the tensor under them. Without `regroups`,
    reshapes that merge or split dims are factors (a sequence cut into chunks stays one)."""
    names = (f"i{k}" for k in itertools.count())
    result = Contraction(out=_fresh(root, names))
    pending = [(root, result.out, True)]
    while pending:
        node, labels, is_root = pending.pop()
        private = is_root or (len(graph.nx.succ[node.name]) == 1 and node.name not in keep)
        expanded = _expand(graph, node, labels, names, products, regroups) if private else None
        if expanded is None:
            result.factors.append(Factor(node, labels))
            continue
        result.nodes.append(node.name)
        pending.extend((source, source_labels, False) for source, source_labels in reversed(expanded))
    result.nodes.reverse()
    return result


def _shape(node: Node) -> tuple[int, ...] | None:
    return node.type.static_shape() if node.type is not None else None


def _fresh(node: Node, names) -> Labels:
    return tuple(next(names) for _ in _shape(node))


def _expand(graph: Graph, node: Node, labels: Labels, names, products: bool = True, allow_regroups: bool = True):
    """[(input, its labels)] for a node the contraction looks through, else None."""
    inputs = [graph.node(name) for name in node.inputs]
    if node.type is None or _shape(node) is None or any(_shape(x) is None for x in inputs):
        return None
    if node.op in ("cast", "identity") and _is_float(node, KERNEL_FLOATS) and _is_float(inputs[0]):
        return [(inputs[0], labels)]
    if (not products and node.op in PRODUCTS) or node.attrs.get("scalar") is not None:
        return None
    if node.op == "reshape" and not allow_regroups and is_regrouping(inputs[0], node):
        return None
    rule = EXPANSIONS.get(node.op)
    return rule(node, inputs, labels, names) if rule is not None else None


def is_regrouping(source: Node, reshape: Node) -> bool:
    """Does the reshape merge or split dims (more than add or drop unit dims)?"""
    return [n for n in _shape(source) if n != 1] != [n for n in _shape(reshape) if n != 1]


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
    """Reshapes that add or drop unit dims, merge adjacent dims or split one: a merged dim's label is
    the tuple of its parts' labels, so (b * h, ...) views of (b, h, ...) tensors line up again; a
    regrouping of several dims into several others is not looked through."""
    source_shape, result_shape = _shape(inputs[0]), _shape(node)
    groups = _reshape_groups(source_shape, result_shape)
    if groups is None:
        return None
    source = [next(names) for _ in source_shape]
    for source_dims, result_dims in groups:
        parts = _regrouped([labels[k] for k in result_dims], len(source_dims))
        if parts is None:
            return None
        for k, label in zip(source_dims, parts):
            source[k] = label
    return [(inputs[0], tuple(source))]


def _regrouped(result_labels: list, count: int) -> list | None:
    """The labels of `count` source dims that form the result dims labelled `result_labels`."""
    if len(result_labels) == count:
        return result_labels
    if count == 1:
        return [tuple(result_labels)]
    if len(result_labels) == 1:
        merged = result_labels[0]
        if isinstance(merged, tuple) and len(merged) == count:
            return list(merged)
        return [f"{merged}.{k}" for k in range(count)]
    return None


def _reshape_groups(source: tuple, result: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pairs (source dims, result dims) of equal size products, in order; a unit dim pairs with a unit
    dim facing it, or stands alone."""
    groups, i, j = [], 0, 0
    while i < len(source) or j < len(result):
        if i < len(source) and j < len(result) and source[i] == result[j] == 1:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
        elif i < len(source) and source[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(result) and result[j] == 1:
            groups.append(([], [j]))
            j += 1
        else:
            found = _equal_products(source, result, i, j)
            if found is None:
                return None
            groups.append(found)
            i, j = found[0][-1] + 1, found[1][-1] + 1
    return groups


def _equal_products(source: tuple, result: tuple, i: int, j: int) -> tuple[list[int], list[int]] | None:
    """The shortest runs of sized dims from source[i] and result[j] with equal products."""
    if i >= len(source) or j >= len(result):
        return None
    source_dims, result_dims, a, b = [i], [j], source[i], result[j]
    while a != b:
        if a < b:
            i += 1
            if i >= len(source) or source[i] == 1:
                return None
            source_dims.append(i)
            a *= source[i]
        else:
            j += 1
            if j >= len(result) or result[j] == 1:
                return None
            result_dims.append(j)
            b *= result[j]
    return source_dims, result_dims


def _select(node, inputs, labels, names):
    """x[..., 0, ...] of a unit dim drops it, as a reshape would; any other select picks values."""
    if _shape(inputs[0])[node.attrs["dim"]] != 1:
        return None
    dim = node.attrs["dim"]
    return [(inputs[0], labels[:dim] + (next(names),) + labels[dim:])]


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
EXPANSIONS = {"mul": _mul, "permute": _permute, "expand": _expand_op, "reshape": _reshape, "select": _select,
              "sum": _sum,
              "einsum": _einsum, "matmul": _matmul}

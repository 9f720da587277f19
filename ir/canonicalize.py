"""Canonicalisation: rewrite the IR so one pattern covers many spellings.

    x.to(x.dtype), x.detach(), eval-mode dropout(x)    -> x  (they return x itself;
                                                        contiguous/clone stay: strides matter)
    x[:, :n] with n the dim's size (a cut to a length it already has) -> x
    conv1d(...).transpose(1, 2)[:, :L] (a permute read by the slice alone) -> conv1d(...)[..., :L].transpose(1, 2)
                                                        (mamba2-minimal's causal cut after the transpose back)
    silu(permute(conv1d(...) or its cut)) (the permute read by silu alone) -> permute(silu(...)), the
                                                        activation next to the convolution
    x / c                                               -> x * (1/c)       (attrs only)
    einsum("...ic,...cj->...ij", a, b) (any index order) -> permute + matmul (+ permute)
    einsum of n > 2 operands                             -> 2-operand einsums, left to right, each summing
                                                           what nothing later reads
    einsum("bhl,chl->bchl", a, b, ...) (no index summed)  -> permute + reshape (unit dims) of each, then mul
                                                           (a broadcast product, e.g. S4's spectral product)
    addmm/baddbmm(c, a, b, beta, alpha)                  -> (a @ b) * alpha + c * beta  (factors of 1 and
                                                           terms times 0 dropped; a factor may be a
                                                           0-d tensor)
    reshape(expand(reshape(x, [b,h,1,l,d]), [b,h,n,l,d]), [b,h*n,l,d])
    and repeat_interleave(x, n, dim=1)                  -> repeat_kv(x, n)    (GQA/MQA)
    reshape([contiguous](expand(x with a unit dim after k, r copies))) merging them into dim k
                                                        -> repeat_interleave(x, r, k) (any rank; Mamba-2's
                                                           B and C per head)
    x.expand_as(y), x.view_as(y), x.type_as(y)          -> the same op from its attrs, no longer reading y
                                                           (only y's shape or dtype mattered; static shapes)
    x[:, None, ..., i]  (one int among full slices and Nones) -> reshape(select(x, dim, i))
    gather(x, d, idx[:, None].expand(-1, n)) (idx 1-D, viewed along d, expanded to x's other sizes)
                                                        -> index(x, idx, d)  (rows or columns gathered)
    index(b viewed (F, 1), idx, 0) viewed (K,)          -> index(b, idx, 0)  (a bias gathered by F.embedding)
    cat([zeros(...), x, zeros(...)], dim) (either zeros optional) -> pad(x, widths)  (zero padding
                                                           spelled as a concatenation)
    where(c, x, zeros_like(x)) (zeros, new_zeros, full(.., 0), tensor(0.); either branch; not widening
    the result's shape or dtype)                        -> where(c, x, 0.0)
    where(x >= t, x, 0) (t >= 0 a number; > t; where(x < t, 0, x)) -> where(x >= t, relu(x), 0)  (FATReLU)
    x * sigmoid(x) (either order)                       -> silu(x)  (SiLU / Swish written out)
    e = exp(x - max(x, -1, keepdim)); e / sum(e, -1, keepdim) -> softmax(x, -1)  (softmax written out,
                                                           the max as amax, max(...).values or [0])
    softmax(x - max(x, d, keepdim), d)                  -> softmax(x, d)  (a stable softmax written out)
    out = empty/zeros(...); out[..., i, ...] = y_i for each i of one dim, before anything
    reads out                                           -> stack([y_0, ...], dim)  (a loop filling
                                                           a preallocated buffer, functionalised)
    where(~tril(ones, 0), -inf, cumsum(where(~tril(ones, -1), 0, x[..., None].expand(..., T)), -2))
    and where(~tril(ones, 0), -inf, cs[..., :, None] - cs[..., None, :]), cs = cumsum(x, -1)
                                                        -> segsum(x)  (segment sums, Mamba-2's decay mask;
                                                           masks evaluated at compile time)
    s = dst.copy_(src), src of dst's shape, dtype and device; readers of s's values
    (not writes, not views of it)                       -> read src  (the copy stays: a cache
                                                           update; mamba_ssm's decode step)

The rules are a table, REWRITES (op -> rewrites), that one driver applies to every node something
reads, sweep after sweep, until a sweep changes nothing.

ir.from_fx has already read every in-place write as a new version of what it writes, and a
rewrite whose new node would read a tensor across such a write is abandoned (StaleRead), so
none of these trusts a producer that a write changed.

Nodes created here have no fx call; ir.to_fx lowers them through its op table. Their
fake values are computed by running the canonical torch op on the inputs' fake values.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ir.consteval import evaluate
from ir.graph import Graph, Node, Ref, StaleRead
from ir.match import int_index
from ir.mutation import storages
from ir.types import TensorType


def canonicalize(graph: Graph) -> Graph:
    """Apply REWRITES to every node that something reads, sweep after sweep, until a sweep changes
    nothing (a rewrite may enable another: an identity dropped brings a copy's readers into view)."""
    for _ in range(MAX_SWEEPS):
        before = graph.changes
        for node in list(graph):
            rules = REWRITES.get(_key(node), ())
            for rewrite in rules if rules and _rewritable(graph, node) else ():
                try:
                    rewrite(graph, node)
                except StaleRead:
                    pass  # the nodes made so far are read by nothing: dead code removes them
                if node.name not in graph:
                    break
        if graph.changes == before:
            break
    return graph


def _rewritable(graph: Graph, node: Node) -> bool:
    """Something reads it, and no write reaches its memory (a rewrite's result would be a new tensor
    the write misses), but for the rules that stay exact then (copy_, an alias, a buffer being filled)."""
    if node.name not in graph or not graph.users(node.name):
        return False
    return _key(node) in WRITE_RULES or not graph.writers_of([node.name]) - {node.name}


def _key(node: Node) -> str:
    """The node's op; an opaque "torch" op's call target where rules name it, so an unnormalised call
    that shares an IR op's name (a rounding div, an alpha add) never meets that op's rules."""
    if node.op != "torch":
        return node.op
    return node.attrs["target"] if node.attrs["target"] in OPAQUE_TARGETS else "torch"


def _drop_alias(graph: Graph, node: Node) -> None:
    if node.attrs["alias"]:
        graph.replace_uses(node.name, node.inputs[0])


def _drop_noop_dropout(graph: Graph, node: Node) -> None:
    if not node.attrs["training"] or node.attrs["p"] == 0:
        graph.replace_uses(node.name, node.inputs[0])


def _drop_full_slice(graph: Graph, node: Node) -> None:
    """A slice keeping every entry of its dim in order is its input (static sizes only)."""
    shape = node.type.static_shape() if node.type is not None else None
    source = graph.node(node.inputs[0])
    if shape is not None and source.type is not None and shape == source.type.static_shape() \
            and node.attrs["start"] == 0 and node.attrs["step"] == 1:
        graph.replace_uses(node.name, source.name)


def _cut_before_permute(graph: Graph, node: Node) -> None:
    """slice(permute(conv1d(x)), dim d) is permute(slice(conv1d(x), dim perm[d])): the cut moves next
    to the convolution, where the short-conv pass reads it."""
    permuted = graph.node(node.inputs[0])
    if permuted.op != "permute" or len(graph.users(permuted.name)) != 1 or graph.node(permuted.inputs[0]).op != "conv1d":
        return
    source = graph.node(permuted.inputs[0])
    perm, attrs = permuted.attrs["perm"], dict(node.attrs)
    attrs["dim"] = perm[attrs["dim"]]
    value = source.value.narrow(attrs["dim"], attrs["start"], max(attrs["stop"] - attrs["start"], 0))
    value = value[(slice(None),) * attrs["dim"] + (slice(None, None, attrs["step"]),)]
    cut = _new_node(graph, node, "slice", [source.name], attrs, value)
    graph.replace_uses(node.name, _permute(graph, node, cut, perm).name)


def _silu_before_permute(graph: Graph, node: Node) -> None:
    """silu(permute(y)) of a conv1d's output y (or a cut of it) is permute(silu(y)): elementwise, so exact."""
    permuted = graph.node(node.inputs[0])
    cut = graph.node(permuted.inputs[0]) if permuted.op == "permute" else None
    if cut is None or len(graph.users(permuted.name)) != 1 or len(graph.users(cut.name)) != 1:
        return
    if cut.op != "conv1d" and not (cut.op == "slice" and graph.node(cut.inputs[0]).op == "conv1d"):
        return
    activated = _new_node(graph, node, "silu", [cut.name], {}, torch.nn.functional.silu(cut.value))
    graph.replace_uses(node.name, _permute(graph, node, activated, permuted.attrs["perm"]).name)


def _scalar_div_as_mul(graph: Graph, node: Node) -> None:
    if node.attrs["scalar"] not in (None, 0) and not node.attrs["scalar_first"]:
        node.op, node.attrs = "mul", {"scalar": 1.0 / node.attrs["scalar"], "scalar_first": False}
        graph.changes += 1


ZEROS = ("zeros", "zeros_like", "new_zeros")
TWO_TENSORS = {"scalar": None, "scalar_first": False}  # the attrs of a binary op on two tensors
ALLOCATIONS = ("empty", "empty_like", "new_empty", *ZEROS)


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
def _split_einsum(graph: Graph, node: Node) -> None:
    """An einsum of n > 2 operands becomes a chain of 2-operand einsums, left to right, each summing
    the indices that no later operand and not the output holds (mamba_ssm's 4-operand SSD einsums
    then read as Hugging Face writes them: C B^T, times the decay mask, times X)."""
    terms, out = _einsum_terms(node)
    if terms is None or len(terms) <= 2:
        return
    acc, acc_term = graph.node(node.inputs[0]), terms[0]
    for position in range(1, len(terms)):
        term, operand = terms[position], graph.node(node.inputs[position])
        later = "".join(terms[position + 1:]) + out
        kept = out if position == len(terms) - 1 else "".join(
            dict.fromkeys(index for index in acc_term + term if index in later))
        equation = f"{acc_term},{term}->{kept}"
        acc = _new_node(graph, node, "einsum", [acc.name, operand.name], {"equation": equation},
                        torch.einsum(equation, acc.value, operand.value))
        acc_term = kept
    graph.replace_uses(node.name, acc.name)


def _einsum_terms(node: Node) -> tuple[list[str] | None, str]:
    """(input terms, output) of an explicit einsum without repeated indices in a term; (None, "") else."""
    inputs, _, out = node.attrs["equation"].partition("->")
    terms = inputs.split(",")
    if len(terms) != len(node.inputs) or any(len(set(term)) != len(term) for term in terms + [out]):
        return None, ""
    return terms, out


def _rewrite_einsum(graph: Graph, node: Node) -> None:
    """Batched-matmul einsums become matmul; anything else stays an einsum. A batch index one operand
    lacks (PaLM's single-head keys, 'bhid,bjd->bhij') becomes a unit dim it broadcasts along."""
    plan = _einsum_plan(node.attrs["equation"], len(node.inputs))
    if plan is None:
        return
    terms, product, out = plan
    operands = [graph.node(name) for name in node.inputs]
    if any(set(term) != set(order) and operand.type.static_shape() is None
           for operand, term, order in zip(operands, terms, product)):
        return
    a, b = (_aligned(graph, node, operand, term, order) for operand, term, order in zip(operands, terms, product))
    matmul = _new_node(graph, node, "matmul", [a.name, b.name], {}, torch.matmul(a.value, b.value))
    result = _permute(graph, node, matmul, tuple(product[2].index(x) for x in out))
    graph.replace_uses(node.name, result.name)


def _einsum_plan(equation: str, operands: int):
    """For 'batch+i+c, batch+c+j -> out' (any order; a batch index may be missing from one operand):
    (the two terms, the index orders of the two matmul operands and its product, out)."""
    if operands != 2 or "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    contracted = [c for c in a if c in b and c not in out]
    rows = [x for x in out if x in a and x not in b]
    cols = [x for x in out if x in b and x not in a]
    if len(contracted) != 1 or not rows or not cols or set(a) | set(b) != set(out) | set(contracted):
        return None
    (c,), i, j = contracted, rows[-1], cols[-1]
    batch = "".join(x for x in out if x not in (i, j))
    return (a, b), (batch + i + c, batch + c + j, batch + i + j), out


def _rewrite_einsum_product(graph: Graph, node: Node) -> None:
    """An einsum that sums over no index is a broadcast product: each operand's dims permuted into
    the output's order, unit dims reshaped in where it lacks an index, then multiplied."""
    terms = _product_terms(node.attrs["equation"], len(node.inputs))
    operands = [graph.node(name) for name in node.inputs]
    if terms is None or any(o.type is None or o.type.static_shape() is None for o in operands):
        return
    *inputs, out = terms
    factors = [_aligned(graph, node, operand, term, out) for operand, term in zip(operands, inputs)]
    product = functools.reduce(lambda a, b: _new_node(graph, node, "mul", [a.name, b.name], dict(TWO_TENSORS),
                                                      torch.mul(a.value, b.value)), factors)
    if product.type == node.type:
        graph.replace_uses(node.name, product.name)


def _product_terms(equation: str, operands: int) -> list[str] | None:
    """[term of each operand..., output] when every index of an operand appears once in it and in
    the output, and every output index in some operand (nothing is summed); None otherwise."""
    if operands < 2 or "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != operands or len(set(out)) != len(out) or set(out) != set("".join(terms)):
        return None
    return None if any(len(set(term)) != len(term) for term in terms) else [*terms, out]


def _aligned(graph: Graph, anchor: Node, operand: Node, term: str, out: str) -> Node:
    """`operand` (indices `term`) with its dims in the order of `out` and a unit dim for each index it lacks."""
    kept = [index for index in out if index in term]
    permuted = _permute(graph, anchor, operand, tuple(term.index(index) for index in kept))
    if len(kept) == len(out):
        return permuted
    sizes = dict(zip(kept, permuted.type.static_shape()))
    shape = tuple(sizes.get(index, 1) for index in out)
    if shape == permuted.type.static_shape():
        return permuted
    return _new_node(graph, anchor, "reshape", [permuted.name], {"shape": shape}, permuted.value.reshape(shape))


# -- addmm -------------------------------------------------------------------------
def _rewrite_addmm(graph: Graph, node: Node) -> None:
    added, a, b, *tensor_factors = (graph.node(name) for name in node.inputs[:node.value_inputs])
    beta, alpha = (tensor_factors.pop(0) if node.attrs[key] is None else node.attrs[key] for key in ("beta", "alpha"))
    result = _new_node(graph, node, "matmul", [a.name, b.name], {}, torch.matmul(a.value, b.value))
    result = _scaled(graph, node, result, alpha)
    if isinstance(beta, Node) or beta != 0:
        added = _scaled(graph, node, added, beta)
        result = _new_node(graph, node, "add", [result.name, added.name], dict(TWO_TENSORS),
                           torch.add(result.value, added.value))
    graph.replace_uses(node.name, result.name)


def _scaled(graph: Graph, anchor: Node, source: Node, factor) -> Node:
    """source * factor: a number (nothing when 1) or a 0-d tensor node (type promotion keeps source's dtype)."""
    if isinstance(factor, Node):
        return _new_node(graph, anchor, "mul", [source.name, factor.name], dict(TWO_TENSORS),
                         torch.mul(source.value, factor.value))
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


def _rewrite_expanded_repeat(graph: Graph, node: Node) -> None:
    """reshape(expand(x with a unit dim after dim k, r along it), ...) merging dim k with the r copies
    (a .contiguous() copy between them or not): repeat_interleave(x, r, dim=k), reshaped when unit
    dims differ. Mamba-2's B and C per head, GQA's K and V spelled this way, of any rank."""
    found = _expanded_repeat_source(graph, node)
    if found is None or not graph.users(node.name):
        return
    x, repeats, dim = found
    value = torch.repeat_interleave(x.value, repeats, dim=dim)
    repeated = _new_node(graph, node, "repeat_interleave", [x.name], {"repeats": repeats, "dim": dim}, value)
    if tuple(value.shape) != node.type.static_shape():
        repeated = _new_node(graph, node, "reshape", [repeated.name], {"shape": node.type.static_shape()},
                             value.reshape(node.type.static_shape()))
    graph.replace_uses(node.name, repeated.name)


def _expanded_repeat_source(graph: Graph, node: Node) -> tuple[Node, int, int] | None:
    """(x, r, k) when `node` reshapes x[..., k, None, ...] expanded to r copies with the copies after
    each entry of dim k, and nothing else changed but unit dims."""
    expanded = graph.node(node.inputs[0])
    if expanded.op == "identity":
        expanded = graph.node(expanded.inputs[0])
    unsqueezed = graph.node(expanded.inputs[0]) if expanded.op == "expand" else None
    if unsqueezed is None or unsqueezed.op != "reshape" or node.type.static_shape() is None:
        return None
    x = graph.node(unsqueezed.inputs[0])
    shape, wide = x.type.static_shape() if x.type is not None else None, expanded.type.static_shape()
    if shape is None or wide is None or unsqueezed.type.static_shape() is None:
        return None
    for k in range(len(shape)):
        if unsqueezed.type.static_shape() == shape[:k + 1] + (1,) + shape[k + 1:] and wide[:k + 1] + wide[k + 2:] \
                == shape and wide[k + 1] > 1:
            merged = shape[:k] + (shape[k] * wide[k + 1],) + shape[k + 1:]
            if [n for n in merged if n != 1] == [n for n in node.type.static_shape() if n != 1]:
                return x, wide[k + 1], k
    return None


# -- reads of a tensor's shape or dtype alone --------------------------------------------
def _drop_metadata_reads(graph: Graph, node: Node) -> None:
    """Inputs read only for the shape or dtype the attrs already hold are dropped; the node then
    lowers from its attrs (ir.to_fx), so no pattern sees them as readers of that tensor."""
    if node.value_inputs is None or len(node.inputs) <= node.value_inputs:
        return
    if node.op != "cast" and not all(isinstance(size, int) for size in node.attrs["shape"]):
        return
    graph.set_inputs(node.name, node.inputs[:node.value_inputs])
    node.call = None


# -- x[:, None, ..., i] ----------------------------------------------------------------
def _rewrite_select_unsqueeze(graph: Graph, node: Node) -> None:
    """One int among full slices, Nones and at most one Ellipsis: select that dim, then a reshape
    adds the unit dims (x[i] alone, without Nones, is already a select)."""
    source = graph.node(node.inputs[0]) if len(node.inputs) == 1 else None
    index = node.call.args[1] if node.call is not None and len(node.call.args) == 2 else None
    if source is None or source.type is None or node.type is None or node.type.static_shape() is None:
        return
    picked = int_index(index, source.value.shape)
    if picked is None:
        return
    dim, position = picked
    shape = node.type.static_shape()
    value = torch.select(source.value, dim, position)
    selected = _new_node(graph, node, "select", [source.name], {"dim": dim, "index": position}, value)
    result = _new_node(graph, node, "reshape", [selected.name], {"shape": tuple(shape)}, value.reshape(shape))
    graph.replace_uses(node.name, result.name)


# -- gather along one dim by a broadcast index -------------------------------------------
def _rewrite_broadcast_gather(graph: Graph, node: Node) -> None:
    """gather(x, d, idx viewed along d and expanded to x's other sizes): index(x, idx, d), the
    slices x[..., idx[k], ...] (a gather of weight rows or columns written with torch.gather)."""
    call = node.call
    if call is None or len(node.inputs) != 2 or node.type is None or node.type.static_shape() is None:
        return
    x, expanded = (graph.node(name) for name in node.inputs)
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    idx = _broadcast_index(graph, expanded, x, dim) if isinstance(dim, int) and x.type is not None else None
    if idx is None or call.args[0] != Ref(0):
        return
    indexed = _new_node(graph, node, "index", [x.name, idx.name], {"dim": dim % x.type.rank}, node.value)
    graph.replace_uses(node.name, indexed.name)


def _broadcast_index(graph: Graph, expanded: Node, x: Node, dim: int) -> Node | None:
    """idx (K,), when `expanded` is idx reshaped to unit dims but at `dim` and expanded to x's shape there."""
    shape, x_shape = expanded.type.static_shape(), x.type.static_shape()
    if expanded.op != "expand" or shape is None or x_shape is None or len(shape) != len(x_shape) or not shape:
        return None
    dim %= len(shape)
    viewed = graph.node(expanded.inputs[0])
    idx = graph.node(viewed.inputs[0]) if viewed.op == "reshape" else None
    if idx is None or idx.type is None or idx.type.rank != 1 or idx.type.dtype not in (torch.int32, torch.int64):
        return None
    unit_view = tuple(shape[dim] if d == dim else 1 for d in range(len(shape)))
    others = [size for d, size in enumerate(shape) if d != dim] == [s for d, s in enumerate(x_shape) if d != dim]
    return idx if others and viewed.type.static_shape() == unit_view else None


def _rewrite_vector_gather(graph: Graph, node: Node) -> None:
    """index(b viewed as (F, 1), idx, 0) viewed back as (K,): index(b, idx, 0) (a bias gathered with
    F.embedding, which reads rows of a 2-D table only)."""
    indexed = graph.node(node.inputs[0])
    if indexed.op != "index" or indexed.attrs["dim"] != 0 or node.type is None:
        return
    table, idx = (graph.node(name) for name in indexed.inputs[:2])
    vector = graph.node(table.inputs[0]) if table.op == "reshape" else None
    if vector is None or vector.type is None or vector.type.rank != 1 or idx.type.rank != 1:
        return
    if tuple(table.type.shape) != (vector.type.shape[0], 1) or tuple(node.type.shape) != tuple(idx.type.shape):
        return
    gathered = _new_node(graph, node, "index", [vector.name, idx.name], {"dim": 0}, node.value)
    graph.replace_uses(node.name, gathered.name)


# -- zero padding spelled as a concatenation -------------------------------------------
def _rewrite_zero_padding(graph: Graph, node: Node) -> None:
    """cat([zeros, x, zeros], dim) with zeros of x's dtype and device on one or both sides: pad(x)."""
    parts = [graph.node(name) for name in node.inputs]
    zeros = [part.op == "torch" and part.attrs["target"] in ZEROS for part in parts]
    if len(parts) not in (2, 3) or zeros.count(False) != 1 or (len(parts) == 3 and zeros[1]):
        return
    at = zeros.index(False)
    x = parts[at]
    if any(part.type is None or part.type.static_shape() is None
           or (part.type.dtype, part.type.device) != (x.type.dtype, x.type.device) for part in parts):
        return
    rank = x.type.rank
    dim = node.attrs["dim"] % rank
    shapes = [part.type.static_shape() for part in parts]
    if any(shape[:dim] + shape[dim + 1:] != shapes[at][:dim] + shapes[at][dim + 1:] for shape in shapes):
        return
    widths = (0,) * (2 * (rank - dim - 1)) + (sum(shape[dim] for shape in shapes[:at]),
                                              sum(shape[dim] for shape in shapes[at + 1:]))
    value = torch.nn.functional.pad(x.value, widths)
    padded = _new_node(graph, node, "pad", [x.name], {"pad": widths, "mode": "constant", "value": 0.0}, value)
    graph.replace_uses(node.name, padded.name)


# -- zero spelled as a tensor in a where ------------------------------------------------
ZERO_FILLS = {"full": 1, "full_like": 1, "new_full": 2, "tensor": 0, "scalar_tensor": 0}  # target -> fill arg


def _is_zero_fill(node: Node) -> bool:
    """A fresh tensor of zeros: zeros, zeros_like, new_zeros, full(..., 0), tensor(0.)..."""
    if node.op != "torch":
        return False
    target = node.attrs["target"]
    if target in ZEROS:
        return True
    position = ZERO_FILLS.get(target)
    if position is None or node.call is None or len(node.call.args) <= position:
        return False
    fill = node.call.args[position]
    return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill == 0


def _rewrite_thresholded_relu(graph: Graph, node: Node) -> None:
    """where(x >= t, x, 0) with t >= 0 a number (or > t; or where(x < t, 0, x), <= t): the x it keeps is
    relu(x), so where(..., relu(x), 0) (ProSparse's FATReLU as an activation the sparse-MLP pass knows)."""
    if node.op != "where" or len(node.inputs) != 2:
        return
    condition, x = (graph.node(name) for name in node.inputs)
    kept_when = {(None, 0): ("ge", "gt"), (0, None): ("lt", "le")}.get((node.attrs["then_scalar"], node.attrs["else_scalar"]))
    call = condition.call if condition.op == "torch" and condition.inputs == [x.name] else None
    if kept_when is None or call is None or condition.attrs["target"] not in kept_when or len(call.args) != 2:
        return
    threshold = call.args[1]
    if call.args[0] != Ref(0) or isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        return
    relu = _new_node(graph, node, "relu", [x.name], {"inplace": False}, torch.relu(x.value))
    kept = _new_node(graph, node, "where", [condition.name, relu.name], dict(node.attrs), node.value)
    graph.replace_uses(node.name, kept.name)


def _rewrite_zero_branch(graph: Graph, node: Node) -> None:
    """where(c, x, zeros) (either branch) with zeros that widen neither the result's shape nor its
    dtype: where(c, x, 0.0), so passes that accept a scalar zero see one."""
    if len(node.inputs) != 3 or node.type is None or node.type.static_shape() is None:
        return  # a branch is a scalar already
    condition, then, other = (graph.node(name) for name in node.inputs)
    for key, zero, kept in (("then_scalar", then, other), ("else_scalar", other, then)):
        if not _is_zero_fill(zero) or kept.type is None or condition.type is None:
            continue
        shapes = [t.type.static_shape() for t in (condition, kept)]
        if None in shapes or tuple(torch.broadcast_shapes(*shapes)) != node.type.static_shape():
            continue
        if not kept.type.dtype.is_floating_point or kept.type.dtype != node.type.dtype:
            continue
        node.attrs = {**node.attrs, key: 0.0}
        graph.set_inputs(node.name, [condition.name, kept.name])
        node.call = None
        graph.changes += 1
        return


# -- activations written out -----------------------------------------------------------
def _rewrite_written_out_silu(graph: Graph, node: Node) -> None:
    """x * sigmoid(x) (either order): silu(x), SiLU / Swish as much model code writes it."""
    if len(node.inputs) != 2 or node.attrs.get("scalar") is not None:
        return
    for x_name, sigmoid_name in (node.inputs, node.inputs[::-1]):
        sigmoid = graph.node(sigmoid_name)
        if sigmoid.op == "sigmoid" and sigmoid.inputs == [x_name] and node.value is not None:
            silu = _new_node(graph, node, "silu", [x_name], {}, node.value)
            graph.replace_uses(node.name, silu.name)
            return


# -- softmax written out ---------------------------------------------------------------
def _rewrite_written_out_softmax(graph: Graph, node: Node) -> None:
    """e / sum(e, -1, keepdim=True) with e = exp(x - rowmax(x)) over the same last dim: softmax(x).
    (Without the max subtracted it is not rewritten: eager overflows where softmax does not.)"""
    if len(node.inputs) != 2:
        return
    e, total = (graph.node(name) for name in node.inputs)
    shifted = graph.node(e.inputs[0]) if e.op == "exp" else None
    if shifted is None or shifted.op != "sub" or len(shifted.inputs) != 2 or e.type is None:
        return
    last = e.type.rank - 1
    if total.op != "sum" or total.inputs != [e.name] or total.attrs != {"dim": (last,), "keepdim": True, "dtype": None}:
        return
    x, row_max = (graph.node(name) for name in shifted.inputs)
    if not _is_row_max(graph, row_max, x, last):
        return
    value = torch.softmax(x.value, dim=last)
    softmax = _new_node(graph, node, "softmax", [x.name], {"dim": last, "dtype": None}, value)
    graph.replace_uses(node.name, softmax.name)


def _drop_shift_before_softmax(graph: Graph, node: Node) -> None:
    """softmax(x - rowmax(x), d) over the same dim d: softmax(x, d) (lucidrains' stable softmax; softmax
    subtracts the row max itself, and a row holding inf or nan gives nan either way)."""
    shifted = graph.node(node.inputs[0])
    if shifted.op != "sub" or len(shifted.inputs) != 2 or node.type is None:
        return
    x, row_max = (graph.node(name) for name in shifted.inputs)
    if not _is_row_max(graph, row_max, x, node.attrs["dim"]) or x.type != shifted.type:
        return
    softmax = _new_node(graph, node, "softmax", [x.name], dict(node.attrs), node.value)
    graph.replace_uses(node.name, softmax.name)


def _is_row_max(graph: Graph, node: Node, x: Node, dim: int) -> bool:
    """Is `node` x.amax(dim, keepdim=True), or x.max(dim, keepdim=True) values ([0] or .values)? (dim >= 0)"""
    if node.op == "torch" and node.attrs["target"] == "getitem" and node.call.args[1:] == (0,):
        node = graph.node(node.inputs[0])
        reduction = "max"
    else:
        reduction = "amax"
    if node.op != "torch" or node.attrs["target"] != reduction or node.inputs != [x.name] or node.call is None:
        return False
    args, kwargs = node.call.args, node.call.kwargs
    reduced = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = reduced if isinstance(reduced, (tuple, list)) else (reduced,)
    return keepdim is True and len(dims) == 1 and isinstance(dims[0], int) and dims[0] % x.type.rank == dim


# -- segment sums ------------------------------------------------------------------------
def _rewrite_segment_sum(graph: Graph, node: Node) -> None:
    """where(j > i, -inf, S) over the last two dims with S[..., i, j] = x[..., j+1] + ... + x[..., i]:
    segsum(x). S spelled as a cumsum down the rows of x broadcast along a new last dim with its
    upper triangle and diagonal zeroed (Hugging Face's segment_sum, mamba_ssm's segsum), or as a
    difference of running sums, cs[..., :, None] - cs[..., None, :] (mamba_ssm's segsum_unstable)."""
    sums = _kept_branch(graph, node, float("-inf"), diagonal=0)
    x = None if sums is None else _masked_cumsum_source(graph, sums) or _cumsum_difference_source(graph, sums)
    if x is None:
        return
    segsum = graph.add(Node(name=graph.fresh_name(f"{node.name}_segsum"), op="segsum", inputs=[x.name],
                            type=node.type, value=node.value, order=node.order))
    graph.replace_uses(node.name, segsum.name)


def _kept_branch(graph: Graph, where: Node, fill: float, diagonal: int) -> Node | None:
    """t, when `where` is where(c, fill, t) or where(c, t, fill) with c a constant that keeps t exactly
    on tril(ones(T, T), diagonal) of the last two dims (and alike along any others)."""
    shape = where.type.static_shape() if where.type is not None else None
    if where.op != "where" or len(where.inputs) != 2 or shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
        return None
    then, other = where.attrs["then_scalar"], where.attrs["else_scalar"]
    if fill not in (then, other) or (then is None) == (other is None):
        return None
    condition = evaluate(graph, graph.node(where.inputs[0]), {})
    if not isinstance(condition, torch.Tensor) or condition.dtype != torch.bool or condition.shape[-2:] != shape[-2:]:
        return None
    if any(size != 1 for size in condition.shape[:-2]):
        return None
    kept = ~condition if then == fill else condition
    expected = torch.ones(shape[-2:], dtype=torch.bool, device=kept.device).tril(diagonal)
    return graph.node(where.inputs[1]) if torch.equal(kept.reshape(shape[-2:]), expected) else None


def _masked_cumsum_source(graph: Graph, sums: Node) -> Node | None:
    """x, when sums = cumsum(where(strictly upper, 0, x[..., :, None] broadcast), dim=-2)."""
    if sums.op != "cumsum" or sums.attrs["dtype"] is not None or sums.attrs["dim"] != sums.type.rank - 2:
        return None
    columns = _kept_branch(graph, graph.node(sums.inputs[0]), 0.0, diagonal=-1)
    return None if columns is None else _broadcast_column_source(graph, columns)


def _broadcast_column_source(graph: Graph, node: Node) -> Node | None:
    """x (..., T), when node is x[..., :, None] expanded to (..., T, T)."""
    if node.op != "expand":
        return None
    column = graph.node(node.inputs[0])
    x = graph.node(column.inputs[0]) if column.op == "reshape" else None
    if x is None or x.type is None or x.type.static_shape() is None:
        return None
    shape = x.type.static_shape()
    fits = column.type.static_shape() == shape + (1,) and node.type.static_shape() == shape + shape[-1:]
    return x if fits else None


def _cumsum_difference_source(graph: Graph, sums: Node) -> Node | None:
    """x, when sums = cs[..., :, None] - cs[..., None, :] with cs = cumsum(x, dim=-1)."""
    if sums.op != "sub" or len(sums.inputs) != 2:
        return None
    rows, columns = (graph.node(name) for name in sums.inputs)
    if rows.op != "reshape" or columns.op != "reshape" or rows.inputs != columns.inputs:
        return None
    running = graph.node(rows.inputs[0])
    shape = running.type.static_shape() if running.type is not None else None
    if (running.op != "cumsum" or running.attrs["dtype"] is not None or shape is None
            or running.attrs["dim"] != len(shape) - 1):
        return None
    if rows.type.static_shape() != shape + (1,) or columns.type.static_shape() != shape[:-1] + (1, shape[-1]):
        return None
    return graph.node(running.inputs[0])


# -- the value a copy_ wrote -------------------------------------------------------------
def _forward_copied_value(graph: Graph, copy: Node) -> None:
    """Readers of dst.copy_(src)'s values read src, which holds the same values: the copy (a write
    the caller may see) stays, and a pattern sees through it. Readers that write, stand for a
    later version, or view dst's memory keep reading dst."""
    if len(copy.inputs) != 2 or copy.call is None or len(copy.call.args) != 2:
        return
    dst, src = (graph.node(name) for name in copy.inputs)
    if dst.type is None or dst.type != src.type or dst.type.static_shape() is None:
        return
    memory = storages(copy.value)
    for reader in graph.users(copy.name):
        if reader.writes or reader.attrs.get("target") == "read_after_write" or storages(reader.value) & memory:
            continue
        inputs = [src.name if name == copy.name else name for name in reader.inputs]
        if graph.stale_read(dataclasses.replace(reader, inputs=inputs)) is None:
            graph.set_inputs(reader.name, inputs)


# -- a buffer filled slice by slice ----------------------------------------------------
def _rewrite_filled_buffer(graph: Graph, buffer: Node) -> None:
    """stack(y_i, dim) for a fresh buffer whose every slice i along one dim is written once
    (buffer[..., i, ...] = y_i, y_i of the slice's shape, dtype and device, read by nothing
    else, so no later in-place change can reach it) before anything else reads it: the writes
    form one chain of versions (ir.mutation: each `assign` returns the buffer it wrote, and
    each version's only reader is the next write); anything else stays as written."""
    shape = buffer.type.static_shape() if buffer.type is not None else None
    writes = _write_chain(graph, buffer)
    if shape is None or not writes or graph.writers_of([buffer.name]) - {write.name for write in writes}:
        return  # (a later write to the buffer would miss the stack, a new tensor)
    slices = [int_index(write.call.args[1], shape) if write.call is not None and len(write.call.args) == 3
              else None for write in writes]
    dims = {dim for dim, _ in filter(None, slices)}
    if None in slices or len(dims) != 1:
        return
    (dim,) = dims
    values = {index: graph.node(write.inputs[1]) for (_, index), write in zip(slices, writes)}
    expected = shape[:dim] + shape[dim + 1:]
    if sorted(values) != list(range(shape[dim])) or len(writes) != shape[dim] or any(
            value.type is None or value.type.static_shape() != expected
            or (value.type.dtype, value.type.device) != (buffer.type.dtype, buffer.type.device)
            or len(graph.users(value.name)) != 1 for value in values.values()):
        return
    ys = [values[index] for index in range(shape[dim])]
    stacked = _new_node(graph, writes[-1], "stack", [y.name for y in ys], {"dim": dim},
                        torch.stack([y.value for y in ys], dim))
    graph.replace_uses(writes[-1].name, stacked.name)
    for write in reversed(writes):
        graph.remove(write.name)


def _write_chain(graph: Graph, buffer: Node) -> list[Node]:
    """The assigns buffer -> a_0 -> a_1 -> ..., each the only reader of the version before it."""
    chain, version = [], buffer
    while True:
        users = graph.users(version.name)
        if len(users) != 1 or not _is_assign(users[0]) or users[0].inputs[:1] != [version.name]:
            return chain
        version = users[0]
        chain.append(version)


def _is_assign(node: Node) -> bool:
    return node.op == "torch" and node.attrs["target"] == "assign" and len(node.inputs) == 2


MAX_SWEEPS = 8
OPAQUE_TARGETS = {"getitem", "copy_", "gather", *ALLOCATIONS}  # opaque "torch" ops that REWRITES has rules for, by call target
WRITE_RULES = {"copy_", "identity", *ALLOCATIONS}  # rules that stay exact when a write reaches the node
REWRITES = {  # the rules for a node, by its op (its call's target for an opaque "torch" op)
    "identity": [_drop_alias],
    "dropout": [_drop_noop_dropout],
    "slice": [_drop_full_slice, _cut_before_permute],
    "silu": [_silu_before_permute],
    "div": [_scalar_div_as_mul, _rewrite_written_out_softmax],
    "mul": [_rewrite_written_out_silu],
    "softmax": [_drop_shift_before_softmax],
    "einsum": [_split_einsum, _rewrite_einsum, _rewrite_einsum_product],
    "addmm": [_rewrite_addmm],
    "reshape": [_rewrite_repeat_kv, _rewrite_expanded_repeat, _rewrite_vector_gather, _drop_metadata_reads],
    "repeat_interleave": [_rewrite_repeat_kv],
    "expand": [_drop_metadata_reads],
    "cast": [_drop_metadata_reads],
    "getitem": [_rewrite_select_unsqueeze],
    "gather": [_rewrite_broadcast_gather],
    "cat": [_rewrite_zero_padding],
    "where": [_rewrite_zero_branch, _rewrite_thresholded_relu, _rewrite_segment_sum],
    "copy_": [_forward_copied_value],
    **{allocation: [_rewrite_filled_buffer] for allocation in ALLOCATIONS},
}

"""Sparse-MLP pass (DejaVu, Liu et al. 2023): a contextually sparse MLP becomes two gather kernels.

DejaVu's MLP restricted to the neurons S a predictor picked, y = h[S] W2[:, S]^T + b2, is recognised
(after ir.canonicalize folded the spellings) for the plain MLP and the gated one that PowerInfer,
TurboSparse and ReLU-fied Llama sparsify, with W1, W3 (F, D), W2 (D, F) and each bias optional:

    plain:  h = act(up(x, W1, b1))                               (fc1 -> act -> fc2)
    gated:  h = act(up(x, W1, b1)) * up_act(up(x, W3, b3))        (gate_proj, up_proj; up_act
                                                                  identity, or ReLU: dReLU)
    gathered:  down(h, W2[:, idx], b2), h's weights W1[idx], W3[idx], b1[idx]...   idx (K,), one node
    masked:    down(h * mask, W2, b2)                           mask (..., F) bool or float
               down(where(mask, h, 0), W2, b2)                  bool mask, keeping where True, or
               down(h.masked_fill(mask, 0), W2, b2)             where False; the zero spelled as a
                                                                scalar, zeros_like, tensor(0.)... or 0 * h;
               h[mask] = 0 (CATS, on a fresh h)                 where False (the write stays in PyTorch)
    up, down   F.linear(x, W, b) (nn.Linear) | x @ W^T + b | x @ W^T    W^T as .T, .t(), .mT, transpose
               gate and up may be parts of one merged projection (Phi-3's gate_up_proj(x).chunk(2, -1),
               torch.split, proj[..., a:b])
    W1[idx]    w[idx], w.index_select(0, idx), torch.index_select(w, 0, idx); W2[:, idx] likewise on
               dim 1 (w[:, idx], w[..., idx]); either weight may be stored transposed (w.T[:, idx])
    act        relu (F.relu, torch.relu, x.relu(), nn.ReLU), gelu (F.gelu, nn.GELU; exact or tanh),
               silu (F.silu, nn.SiLU, Hugging Face's act_fn)

The product h * mask is read as one product of factors, in any order and grouping
(act(g) * u * mask, mask * (act(g) * u), (act(g) * mask) * u...); a where may select from h or,
gated, from one factor (where(mask, act(g), 0) * u). A factor is a projection of x, or an
activation of one; anything else is the mask. The mask may come from a predictor, a top-k, or from
the MLP itself (act(gate(x)) > 0, a top-k of |h|: CATS, TurboSparse): then the nodes it reads stay
in PyTorch, computed densely for the mask, and the kernels recompute the selected neurons.

The anchor is the down projection; the fused op reads x, the weights as the graph holds them, and
idx or mask. Whatever computes idx or mask (the predictor, top-k) stays in PyTorch. The runtime
(runtime.sparse_mlp) lowers the masked form to the gathered one over the neurons some row keeps,
with each row's own mask applied in the kernel when rows differ or the mask scales neurons.

A down projection whose weight is gathered, or whose input is a product of projections' factors
and a mask, is a candidate: if the rest does not fit, report() names the node that broke it (an
activation the kernel lacks, an idx that is not 1-D, dropout in training mode, weights gathered by
different indices, gate and up projections of different inputs, three factors, two masks, an
intermediate read elsewhere, float64...). Dense MLPs, gated or not, are no candidates; nor is a
product whose other factor is a float computed from the projection (an activation written out,
such as gelu_new): a mask from the MLP itself is bool (a comparison) or made by a scatter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compiler.passes import NoMatch, PassContext
from ir.fused import FusedSpec, SparseMLPLayout
from ir.graph import Graph, Node
from ir.limits import KERNEL_DTYPES
from ir.match import readers_outside
from ir.pattern import Any, Op, match

PATTERN = "sparse_mlp"
KERNEL_ACTIVATIONS = "relu, gelu, gelu tanh, silu"
MAX_CHAIN = 2  # unary ops between a projection and a factor of h (an activation, then dropout)
SCATTERS = ("scatter", "scatter_", "index_fill", "index_fill_", "index_put", "index_put_")  # masks made by selection

MATMUL = Op("matmul", Any("input"), Any("weight"), bind="product")
BIASED_MATMUL = Op("add", MATMUL, Any("bias"), bind="sum")


@dataclass
class Projection:
    """y = x W^T + b, written as linear(x, W, b) or as x @ W^T (+ b): `weight` is the W^T operand then."""

    input: Node
    weight: Node
    weight_transposed: bool
    bias: Node | None
    nodes: list[str]


@dataclass
class Weight:
    """A canonical weight matrix found behind transposes and at most one index by the neurons."""

    tensor: Node  # what the graph holds
    transposed: bool  # tensor is the canonical matrix transposed
    idx: Node | None  # the neuron index (gathered form)
    nodes: list[str] = field(default_factory=list)  # transposes and the index in between
    rows: tuple[int, int] | None = None  # the neurons' rows of a merged gate_up_proj weight

    def ffn(self) -> int:
        return self.rows[1] - self.rows[0] if self.rows else self.tensor.type.shape[1 if self.transposed else 0]


@dataclass
class Bias:
    operands: list[Node]  # [] or [b1 as the graph holds it]
    nodes: list[str]  # the index that gathered it


@dataclass
class Factor:
    """A factor of h made from one projection: the projection itself, or unary ops of it (act, dropout);
    the projection may be one part of a merged one (Phi-3's gate_up_proj(x).chunk(2, -1))."""

    leaf: Node
    projection: Projection
    chain: list[Node]  # the unary nodes from the projection up to `leaf`
    rows: tuple[int, int] | None = None  # the part's output columns [start, stop) of a merged projection
    split: list[str] = field(default_factory=list)  # the nodes that take the part (chunk, getitem, slice)

    def nodes(self) -> list[str]:
        """The dense intermediates: the projection, the part taken of it, the activation."""
        return self.projection.nodes + self.split + [node.name for node in self.chain]


@dataclass
class Selection:
    """The mask and how it picks neurons: a factor of the product, or a where with a zero."""

    mask: Node
    keeps: bool | None  # where: the mask value that keeps a neuron; None: the mask is a factor
    selects: list[str] = field(default_factory=list)  # where: the leaves it selects from
    zero_is_product: bool = False  # where(mask, h, 0 * h): a dropped inf or NaN is NaN


@dataclass
class Hidden:
    """The down projection's input h, read as a product of factors and selections."""

    factors: list[Factor] = field(default_factory=list)
    selections: list[Selection] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # the muls and wheres that combine them


def run(graph: Graph, context: PassContext) -> None:
    def try_fuse(node: Node) -> None:
        if graph.users(node.name):
            _fuse_candidate(graph, node, context)

    context.for_each_candidate(PATTERN, graph, list(graph), try_fuse)


# -- candidates: down projections of a gathered W2 or of a masked product ---------------------
def _fuse_candidate(graph: Graph, node: Node, context: PassContext) -> None:
    if node.op == "matmul" and _bias_follows(graph, node):
        return
    down = _projection(graph, node)
    if down is None:
        return
    w2 = _weight(graph, down.weight, down.weight_transposed, neuron_dim=1, strict=False)
    if w2 is None:
        return
    hidden = _hidden(graph, down.input)
    if hidden is None or not hidden.factors:
        return  # no MLP, or a product with an activation spelled out
    if w2.idx is None and not hidden.selections:
        return  # a dense MLP, gated or not
    if len(hidden.factors) == 1 and not hidden.factors[0].chain and w2.idx is None:
        return  # a projection times a mask: no activation, no MLP
    _fuse(graph, node, context, down, w2, hidden)


def _hidden(graph: Graph, top: Node) -> Hidden | None:
    """`top` read as a product of factors and selections; None when a float factor that is no
    factor of a projection reads the MLP's own intermediates (GPT-2's gelu_new written out)."""
    hidden = Hidden()
    masks = []
    _collect(graph, top, hidden, masks)
    hidden.selections += [Selection(mask, None) for mask in masks]
    if not hidden.factors:
        return hidden  # no MLP: spare the walk over ancestors
    inside = set(hidden.nodes) | {name for factor in hidden.factors for name in factor.nodes()}
    for selection in hidden.selections:
        if inside & graph.ancestors(selection.mask.name) and not _is_selection_mask(graph, selection.mask):
            return None
    return hidden


def _collect(graph: Graph, node: Node, hidden: Hidden, masks: list[Node]) -> list[str]:
    """Add the factors, selections and masks of `node` to `hidden`; returns the leaves under it."""
    if node.op == "mul" and len(node.inputs) == 2 and node.attrs["scalar"] is None:
        hidden.nodes.append(node.name)
        return [leaf for name in node.inputs for leaf in _collect(graph, graph.node(name), hidden, masks)]
    selected = _zero_selection(graph, node)
    if selected is not None:
        mask, kept, keeps, zero_product = selected
        hidden.nodes += [node.name] + ([zero_product.name] if zero_product is not None else [])
        leaves = _collect(graph, kept, hidden, masks)
        hidden.selections.append(Selection(mask, keeps, leaves, zero_product is not None))
        return leaves
    factor = _factor(graph, node)
    if factor is None:
        masks.append(node)
    else:
        hidden.factors.append(factor)
    return [node.name]


def _zero_selection(graph: Graph, node: Node) -> tuple[Node, Node, bool, Node | None] | None:
    """(bool mask, selected tensor t, the mask value that keeps, the node 0 * t if the zero is one)
    of where(mask, t, 0), t.masked_fill(mask, 0), where(mask, t, 0 * t) or t[mask] = 0 (CATS);
    None for anything else."""
    if _is_zero_assign(graph, node):
        return graph.node(node.inputs[1]), graph.node(node.inputs[0]), False, None
    if node.op != "where":
        return None
    mask = graph.node(node.inputs[0])
    if mask.type is None or mask.type.dtype != torch.bool:
        return None
    then_scalar, else_scalar = node.attrs["then_scalar"], node.attrs["else_scalar"]
    if len(node.inputs) == 2 and 0 in (then_scalar, else_scalar) and None in (then_scalar, else_scalar):
        return mask, graph.node(node.inputs[1]), then_scalar is None, None
    if len(node.inputs) != 3:
        return None
    then, other = (graph.node(name) for name in node.inputs[1:])
    for kept, zero, keeps in ((then, other, True), (other, then, False)):
        if zero.op == "mul" and zero.attrs["scalar"] == 0 and zero.inputs == [kept.name]:
            return mask, kept, keeps, zero
    return None


def _is_zero_assign(graph: Graph, node: Node) -> bool:
    """t[mask] = 0 on a fresh t, mask bool of t's shape: ir.mutation's functional assign."""
    if node.op != "torch" or node.attrs["target"] != "assign" or len(node.inputs) != 2 or node.call is None:
        return False
    value = node.call.args[2] if len(node.call.args) == 3 else None
    target, mask = (graph.node(name) for name in node.inputs)
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
            and mask.type is not None and mask.type.dtype == torch.bool and mask.type.shape == target.type.shape)


def _factor(graph: Graph, leaf: Node) -> Factor | None:
    """`leaf` as a projection (or a part of one), or up to MAX_CHAIN shape-preserving unary float ops
    of one; else None."""
    chain, node = [], leaf
    while True:
        if node.type is None or node.type.dtype == torch.bool:
            return None
        projection = _projection(graph, node)
        if projection is not None:
            return Factor(leaf, projection, chain[::-1])
        part = _projection_part(graph, node)
        if part is not None:
            return Factor(leaf, part[0], chain[::-1], part[1], part[2])
        if len(chain) == MAX_CHAIN or len(node.inputs) != 1 or graph.node(node.inputs[0]).type != node.type:
            return None
        chain.append(node)
        node = graph.node(node.inputs[0])


def _projection_part(graph: Graph, node: Node) -> tuple[Projection, tuple[int, int], list[str]] | None:
    """(projection, the output columns [start, stop) `node` takes, the nodes that take them) for
    proj[..., a:b], proj.chunk(n, -1)[i] and proj.split(size or sizes, -1)[i]; else None."""
    if node.op == "slice":
        source = graph.node(node.inputs[0])
        projection = _projection(graph, source)
        if projection is None or node.attrs["step"] != 1 or node.attrs["dim"] != source.type.rank - 1:
            return None
        return projection, (node.attrs["start"], node.attrs["stop"]), [node.name]
    splitter = graph.node(node.inputs[0]) if node.op == "torch" and node.attrs["target"] == "getitem" else None
    if splitter is None or splitter.op != "torch" or splitter.attrs["target"] not in ("chunk", "split"):
        return None
    source = graph.node(splitter.inputs[0])
    projection = _projection(graph, source)
    bounds = _split_bounds(splitter, source.type.rank) if projection is not None else None
    index = node.call.args[1] if node.call is not None and len(node.call.args) == 2 else None
    if bounds is None or not isinstance(index, int) or not 0 <= index < len(bounds):
        return None
    return projection, bounds[index], [splitter.name, node.name]


def _split_bounds(splitter: Node, rank: int) -> list[tuple[int, int]] | None:
    """The [start, stop) of each part of chunk(x, n, dim) or split(x, size or sizes, dim) along the
    last dim, read from the parts' shapes; None along another dim."""
    call, parts = splitter.call, splitter.value
    if call is None or not isinstance(parts, (tuple, list)) or not parts:
        return None
    dim = call.kwargs.get("dim", call.args[2] if len(call.args) > 2 else 0)
    if not isinstance(dim, int) or dim not in (-1, rank - 1):
        return None
    sizes = [part.shape[-1] for part in parts]
    return [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]


def _is_selection_mask(graph: Graph, mask: Node) -> bool:
    """A mask that selects (a comparison, or a scatter into a tensor), through casts."""
    while mask.op == "cast":
        mask = graph.node(mask.inputs[0])
    return mask.type.dtype == torch.bool or (mask.op == "torch" and mask.attrs["target"] in SCATTERS)


# -- the rest of the MLP ----------------------------------------------------------------------
@dataclass
class Roles:
    """The factors as the kernels see them: the gate (activated) and, gated, the up factor."""

    gate: Factor
    up: Factor | None
    selection: Selection | None

    def selects(self) -> str:
        """What the selection picks from: h, or (gated, a where around one factor) "gate" or "up"."""
        if self.selection is None or self.selection.keeps is None or self.up is None:
            return "h"
        chosen = set(self.selection.selects)
        if chosen == {self.gate.leaf.name}:
            return "gate"
        return "up" if chosen == {self.up.leaf.name} else "h"


def _roles(down: Projection, hidden: Hidden, gathered: bool) -> Roles:
    """Which factor is the gate, which the up projection, and the one selection; NoMatch otherwise."""
    if gathered and hidden.selections:
        raise NoMatch(hidden.selections[0].mask, "a mask over neurons that are gathered already")
    if len(hidden.selections) > 1:
        raise NoMatch(hidden.selections[1].mask, "a second mask: the kernels take one selection of neurons")
    selection = hidden.selections[0] if hidden.selections else None
    factors = hidden.factors
    if len(factors) > 2:
        raise NoMatch(down.input, f"{len(factors)} projections multiply: a gated MLP has two, act(gate(x)) * up(x)")
    if len(factors) == 1:
        return Roles(factors[0], None, selection)
    activated = sorted((factor for factor in factors if factor.chain),
                       key=lambda factor: _activation_name(factor.leaf) is None)  # a kernel activation first
    if not activated:
        raise NoMatch(down.input, "neither factor of the gated product is activated (a bilinear MLP)")
    gate = activated[0]
    return Roles(gate, next(factor for factor in factors if factor is not gate), selection)


def _fuse(graph, anchor: Node, context, down: Projection, w2: Weight, hidden: Hidden) -> None:
    """Match the MLP below its down projection and replace it by a fused sparse_mlp node."""
    roles = _roles(down, hidden, w2.idx is not None)
    before = "the down projection" if roles.selection is None else "the mask"
    activation = _factor_activation(graph, roles.gate, before)
    up_activation = "identity" if roles.up is None or not roles.up.chain else _factor_activation(graph, roles.up, before)
    projections = _projection_weights(graph, roles, w2)
    computed = _computed(roles) + hidden.nodes + down.nodes
    kept = _check_private(graph, computed, roles.selection) | {name for name in hidden.nodes if graph.node(name).writes}
    operands = [roles.gate.projection.input] + [node for weight, bias in projections
                                                for node in [weight.tensor] + bias.operands]
    operands += [w2.tensor] + ([down.bias] if down.bias else [])
    ffn = _check_operands(anchor, operands, [weight for weight, _ in projections], w2)
    if roles.selection is not None:
        _check_mask(roles.selection.mask, down.input, roles.gate.leaf, ffn)
    layout = _layout(graph, roles, projections, w2, down, ffn)
    weights_nodes = [name for weight, bias in projections for name in weight.nodes + bias.nodes] + w2.nodes
    replaced = _in_order(graph, [name for name in computed if name not in kept] + weights_nodes)
    spec = FusedSpec(PATTERN, dict(activation=activation, layout=layout, up_activation=up_activation))
    selector = w2.idx if roles.selection is None else roles.selection.mask
    detail = activation if up_activation == "identity" else f"{activation}, {up_activation} up"
    context.fuse(graph, anchor, spec, [n.name for n in operands + [selector]], replaced,
                 f"{layout.describe()}, {detail}")


def _layout(graph, roles: Roles, projections: list[tuple[Weight, Bias]], w2: Weight, down: Projection,
            ffn) -> SparseMLPLayout:
    selection = roles.selection
    (w1, b1), (w3, b3) = projections[0], projections[1] if len(projections) == 2 else (None, None)
    return SparseMLPLayout(
        "gathered" if selection is None else "masked", has_b1=bool(b1.operands), has_b2=down.bias is not None,
        w1_transposed=w1.transposed, w2_transposed=w2.transposed,
        indices_proven=selection is not None or _indices_in_range(graph, w2.idx, ffn),
        mask_keeps=None if selection is None else selection.keeps,
        gated=w3 is not None, has_b3=b3 is not None and bool(b3.operands),
        w3_transposed=w3 is not None and w3.transposed, w1_rows=w1.rows, w3_rows=w3.rows if w3 is not None else None,
        selects=roles.selects(), zero_is_product=selection is not None and selection.zero_is_product)


def _factor_activation(graph, factor: Factor, before: str) -> str:
    """The kernel's name for the factor's activation, applied right to its projection; NoMatch otherwise."""
    _check_activation(factor.leaf, before)
    if len(factor.chain) > 1:
        raise NoMatch(factor.chain[0], "the activation's input is not a projection x W1^T + b1")
    return _activation_name(factor.leaf)


def _projection_weights(graph, roles: Roles, w2: Weight) -> list[tuple[Weight, Bias]]:
    """[(W1, b1)] of the gate (fc1), then (W3, b3) of the gated MLP's up projection: projections of
    one input, gathered by W2's idx (or not at all), parts of one merged weight or not."""
    projections = []
    for name, factor in (("W1", roles.gate), ("W3", roles.up)):
        if factor is None:
            continue
        projection = factor.projection
        if projection.input is not roles.gate.projection.input:
            raise NoMatch(graph.node(projection.nodes[0]), "the gate and up projections read different inputs")
        weight = _weight(graph, projection.weight, projection.weight_transposed, neuron_dim=0, strict=True)
        if weight.idx is not w2.idx:
            raise NoMatch(projection.weight, f"{name} and W2 are not gathered by the same idx")
        if factor.rows is not None and weight.idx is not None:
            raise NoMatch(graph.node(factor.split[-1]), "a part of a projection whose weight is gathered")
        weight.rows = factor.rows
        projections.append((weight, _up_bias(graph, projection, weight)))
    return projections


def _computed(roles: Roles) -> list[str]:
    """The dense intermediates of the factors."""
    return roles.gate.nodes() + (roles.up.nodes() if roles.up is not None else [])


def _indices_in_range(graph, idx: Node, size: int) -> bool:
    """Are idx's values provably in [0, size)? True for top-k/sort/argsort indices over a dim of
    that size, and for the sorted values of such indices (DejaVu's topk(...).indices.sort())."""
    node = idx
    while True:
        if node.op == "cast" and node.type.dtype in (torch.int32, torch.int64):
            node = graph.node(node.inputs[0])
            continue
        producer, item = _tuple_item(graph, node)
        if producer is None:
            return node.op == "torch" and node.attrs["target"] == "argsort" and _sorted_dim_size(graph, node) == size
        if item == 1 and producer.attrs["target"] in ("topk", "sort"):
            return _sorted_dim_size(graph, producer) == size
        if item == 0 and producer.attrs["target"] == "sort":
            node = graph.node(producer.inputs[0])
            continue
        return False


def _tuple_item(graph, node: Node) -> tuple[Node | None, int | None]:
    """(topk/sort node, i) when `node` is item i of its result tuple (result[i] or .values/.indices)."""
    call = node.call
    if node.op != "torch" or call is None or not node.inputs:
        return None, None
    producer = graph.node(node.inputs[0])
    if producer.op != "torch" or producer.attrs["target"] not in ("topk", "sort"):
        return None, None
    if node.attrs["target"] == "getitem" and isinstance(call.args[1], int):
        return producer, call.args[1]
    if node.attrs["target"] == "getattr" and call.args[1] in ("values", "indices"):
        return producer, ("values", "indices").index(call.args[1])
    return None, None


def _sorted_dim_size(graph, node: Node) -> int | None:
    """The size of the dim topk/sort/argsort runs over (their `dim` argument, default last)."""
    call = node.call
    position = {"topk": 2, "sort": 1, "argsort": 1}[node.attrs["target"]]
    dim = call.kwargs.get("dim", call.args[position] if len(call.args) > position else -1)
    source = graph.node(node.inputs[0]).type
    if not isinstance(dim, int) or source is None or source.static_shape() is None:
        return None
    return source.static_shape()[dim]


def _activation_name(node: Node) -> str | None:
    """The kernel's name for the activation `node` computes, or None."""
    if node.op == "relu" and not node.attrs["inplace"]:
        return "relu"
    if node.op == "gelu":
        return "gelu" if node.attrs["approximate"] == "none" else "gelu_tanh"
    if node.op == "silu":
        return "silu"
    return None


def _check_activation(node: Node, before: str) -> None:
    """`node` must be the activation; say what it is otherwise."""
    if _activation_name(node) is not None:
        return
    if node.op == "dropout":
        raise NoMatch(node, f"dropout is active (training mode) between the activation and {before}")
    if node.op == "relu":
        raise NoMatch(node, "in-place relu (nn.ReLU(inplace=True)) over a projection something else also reads")
    name = node.attrs.get("target", node.op)
    raise NoMatch(node, f"{name} is not an activation the kernel fuses ({KERNEL_ACTIVATIONS})")


def _up_bias(graph, up: Projection, w1: Weight) -> Bias:
    """b1 (F,): as given in the masked form; in the gathered form it must be b1[idx] with W1's idx."""
    if up.bias is None:
        return Bias([], [])
    if w1.idx is None:
        return Bias([up.bias], [])
    bias = up.bias
    if bias.op != "index" or bias.attrs["dim"] != 0 or graph.node(bias.inputs[1]) is not w1.idx:
        raise NoMatch(bias, "the bias of the up projection is not b1[idx] with W1's idx")
    return Bias([graph.node(bias.inputs[0])], [bias.name])


def _check_private(graph, computed: list[str], selection: Selection | None) -> set[str]:
    """The dense intermediates (projections, activations, products) must not be read elsewhere,
    but by what computes the mask: those the mask reads stay in PyTorch, and are returned."""
    inside = set(computed)
    mask_side = set() if selection is None else graph.ancestors(selection.mask.name) | {selection.mask.name}
    kept = set()
    for name in computed[:-1]:
        outside = readers_outside(graph, name, inside)
        if any(user not in mask_side for user in outside):
            raise NoMatch(graph.node(name), f"intermediate is also read by {next(u for u in outside if u not in mask_side)}")
        if outside:
            kept |= {name} | (graph.ancestors(name) & inside)
    return kept


def _check_operands(anchor: Node, operands: list[Node], up_weights: list[Weight], w2: Weight):
    """Dtypes and weight shapes the kernels take; returns the number of neurons F."""
    dtype = anchor.type.dtype
    if dtype not in KERNEL_DTYPES:
        raise NoMatch(anchor, f"{dtype} is not supported by the kernels (fp16/bf16/fp32)")
    for node in operands:
        if node.type.dtype != dtype:
            raise NoMatch(node, f"{node.type.dtype} operand in a {dtype} MLP")
    for weight in (*up_weights, w2):
        if weight.tensor.type.rank != 2:
            raise NoMatch(weight.tensor, "the weight is not a matrix")
    ffn_2 = w2.tensor.type.shape[0 if w2.transposed else 1]
    for weight in up_weights:
        if weight.ffn() != ffn_2:
            raise NoMatch(w2.tensor, f"W1 has {weight.ffn()} neurons but W2 {ffn_2}")
    return ffn_2


def _check_mask(mask: Node, product: Node, activated: Node, ffn) -> None:
    """A per-neuron mask (..., F), bool or float, that does not broadcast the activations any wider."""
    if not (mask.type.dtype == torch.bool or mask.type.dtype.is_floating_point):
        raise NoMatch(mask, f"the mask is {mask.type.dtype}, not bool or float")
    if mask.type.rank == 0 or mask.type.shape[-1] != ffn:
        raise NoMatch(mask, f"the factor {tuple(mask.type.shape)} is not a per-neuron mask over {ffn} neurons")
    if product.type.shape != activated.type.shape:
        raise NoMatch(product, "the mask broadcasts the activations to a larger shape")


def _in_order(graph, names: list[str]) -> list[str]:
    return sorted(dict.fromkeys(names), key=lambda name: graph.node(name).order)


# -- projections ------------------------------------------------------------------------------
def _projection(graph: Graph, node: Node) -> Projection | None:
    """`node` read as a projection x W^T + b, or None."""
    if node.op == "linear":
        bias = graph.node(node.inputs[2]) if node.attrs["has_bias"] else None
        return Projection(graph.node(node.inputs[0]), graph.node(node.inputs[1]), False, bias, [node.name])
    found = match(BIASED_MATMUL, graph, node)
    if found and _is_bias(found["bias"], found["product"]):
        return Projection(found["input"], found["weight"], True, found["bias"], [found["product"].name, node.name])
    if node.op == "matmul":
        return Projection(graph.node(node.inputs[0]), graph.node(node.inputs[1]), True, None, [node.name])
    return None


def _is_bias(bias: Node, product: Node) -> bool:
    return bias.type is not None and bias.type.rank == 1 and bias.type.shape[0] == product.type.shape[-1]


def _bias_follows(graph: Graph, product: Node) -> bool:
    """A matmul whose only reader adds a bias: the add is the projection, it anchors the match."""
    users = graph.users(product.name)
    if len(users) != 1 or users[0].op != "add":
        return False
    projection = _projection(graph, users[0])
    return projection is not None and product.name in projection.nodes


# -- weights ----------------------------------------------------------------------------------
def _weight(graph: Graph, node: Node, transposed: bool, neuron_dim: int, *, strict: bool) -> Weight | None:
    """The canonical matrix behind `node`, whose neurons run along `neuron_dim` (W1: 0, W2: 1).

    An index along the other dim is a mismatch when `strict`, else None (not this pattern).
    """
    node, transposed, passed = _untranspose(graph, node, transposed)
    if node.op != "index":
        return Weight(node, transposed, None, passed)
    if node.attrs["dim"] != (neuron_dim if not transposed else 1 - neuron_dim):
        if strict:
            raise NoMatch(node, "the weight is indexed along the model dimension, not the neurons")
        return None
    idx = graph.node(node.inputs[1])
    if idx.type.rank != 1:
        raise NoMatch(node, f"idx is {idx.type.rank}-D: the kernels take one 1-D set of neurons shared by all rows")
    tensor, transposed, more = _untranspose(graph, graph.node(node.inputs[0]), transposed)
    return Weight(tensor, transposed, idx, passed + [node.name] + more)


def _untranspose(graph: Graph, node: Node, transposed: bool) -> tuple[Node, bool, list[str]]:
    """Step over 2-D transposes, each flipping `transposed`; returns (node, transposed, nodes passed)."""
    passed = []
    while node.op == "permute" and node.attrs["perm"] == (1, 0):
        passed.append(node.name)
        node, transposed = graph.node(node.inputs[0]), not transposed
    return node, transposed, passed

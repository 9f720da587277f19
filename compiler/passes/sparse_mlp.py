"""Sparse-MLP pass (DejaVu, Liu et al. 2023): a contextually sparse MLP becomes two gather kernels.

DejaVu's MLP restricted to the neurons S a predictor picked, y = act(x W1[S]^T + b1[S]) W2[:, S]^T + b2,
is recognised (after ir.canonicalize folded the spellings) in the two forms papers write it in,
with W1 (F, D), W2 (D, F) and the biases b1 (F,), b2 (D,) each optional:

    gathered:  down(act(up(x, W1[idx], b1[idx])), W2[:, idx], b2)     idx (K,) int32/int64, one node
    masked:    down(act(up(x, W1, b1)) * mask, W2, b2)                mask (..., F) bool or float,
                                                                      on either side of the product
               down(where(mask, act(...), 0), W2, b2)                 bool mask, keeping where True, or
               down(act(...).masked_fill(mask, 0), W2, b2)            where False
    up, down   F.linear(x, W, b) (nn.Linear) | x @ W^T + b | x @ W^T    W^T as .T, .t(), .mT, transpose
    W1[idx]    w[idx], w.index_select(0, idx), torch.index_select(w, 0, idx); W2[:, idx] likewise on
               dim 1 (w[:, idx], w[..., idx]); either weight may be stored transposed (w.T[:, idx])
    act        relu (F.relu, torch.relu, x.relu(), nn.ReLU), gelu (F.gelu, nn.GELU; exact or tanh)

The anchor is the down projection; the fused op reads x, the weights as the graph holds them, and
idx or mask. Whatever computes idx or mask (the predictor, top-k) stays in PyTorch. The runtime
(runtime.sparse_mlp) lowers the masked form to the gathered one when the mask is 0/1 and shared
by all rows, and runs it in PyTorch otherwise.

A down projection whose weight is gathered, or whose input is (something applied to a projection)
times a tensor, is a candidate: if the rest does not fit, report() names the node that broke it
(an activation the kernel lacks such as SiLU, an idx that is not 1-D, dropout in training mode,
W1 and W2 gathered by different indices, an intermediate read elsewhere, float64...). Gated MLPs,
act(gate(x)) * up(x) as in SwiGLU, are no candidates: neither factor is a mask; nor is a product
whose other factor reads the projection too (an activation written out, such as gelu_new).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from codegen.sparse_mlp import KERNEL_DTYPES
from compiler.passes import NoMatch, PassContext
from ir.graph import Graph, Node
from ir.pattern import Any, Op, match
from runtime.sparse_mlp import SparseMLPLayout, SparseMLPOp

PATTERN = "sparse_mlp"
KERNEL_ACTIVATIONS = "relu, gelu, gelu tanh"

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


@dataclass
class Bias:
    operands: list[Node]  # [] or [b1 as the graph holds it]
    nodes: list[str]  # the index that gathered it


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
    if w2.idx is not None:
        _fuse(graph, node, context, down, w2, down.input, mask=None)
        return
    split = _masked_product(graph, down.input) or _masked_select(graph, down.input)
    if split is not None:
        _fuse(graph, node, context, down, w2, *split)


def _masked_select(graph: Graph, node: Node) -> tuple[Node, Node, bool] | None:
    """(activation, bool mask, the mask value that keeps a neuron) of where(mask, act, 0) or
    act.masked_fill(mask, 0); None when `node` is no such selection."""
    if node.op != "where" or len(node.inputs) != 2:
        return None
    mask, activated = (graph.node(name) for name in node.inputs)
    then_scalar, else_scalar = node.attrs["then_scalar"], node.attrs["else_scalar"]
    fill = then_scalar if then_scalar is not None else else_scalar
    if mask.type.dtype != torch.bool or fill != 0 or _activation_name(activated) is None or _reads(graph, mask, activated):
        return None
    return activated, mask, then_scalar is None


def _masked_product(graph: Graph, node: Node) -> tuple[Node, Node] | None:
    """(activation side, mask) of `node` = activated * mask, or None when it is no such product.

    The activation side is a supported activation, else a unary op of a projection (SiLU...,
    reported later) or dropout. A product of two gates, act(gate(x)) * up(x), is a gated MLP.
    """
    if node.op != "mul" or len(node.inputs) != 2:
        return None
    first, second = (graph.node(name) for name in node.inputs)
    if _is_gate(graph, first) and _is_gate(graph, second):
        return None
    for activated, mask in ((first, second), (second, first)):
        if _activation_name(activated) is not None and not _reads(graph, mask, activated):
            return activated, mask
    for activated, mask in ((first, second), (second, first)):
        if activated.op == "dropout" or (len(activated.inputs) == 1 and _is_gate(graph, activated)
                                         and _projection(graph, activated) is None):
            return (activated, mask) if not _reads(graph, mask, activated) else None
    return None


def _reads(graph: Graph, mask: Node, activated: Node) -> bool:
    """Does `mask` depend on the activation's input? Then the product is an activation spelled out
    (GPT-2's gelu_new: 0.5 * x * (1 + tanh(...))), not a neuron mask, which comes from a predictor."""
    return bool(activated.inputs) and activated.inputs[0] in graph.ancestors(mask.name)


def _is_gate(graph: Graph, node: Node) -> bool:
    """A float projection, or a shape-preserving op of one: act(gate(x)) or up(x). Bool masks never are."""
    if node.type is None or node.type.dtype == torch.bool:
        return False
    if _projection(graph, node) is not None:
        return True
    return bool(node.inputs) and _projection(graph, graph.node(node.inputs[0])) is not None and \
        graph.node(node.inputs[0]).type.shape == node.type.shape


# -- the rest of the MLP ----------------------------------------------------------------------
def _fuse(graph, anchor: Node, context, down: Projection, w2: Weight, activated: Node, mask: Node | None,
          mask_keeps: bool | None = None) -> None:
    """Match the MLP below its down projection and replace it by a SparseMLPOp."""
    _check_activation(activated, "the down projection" if mask is None else "the mask")
    up = _projection(graph, graph.node(activated.inputs[0]))
    if up is None:
        raise NoMatch(graph.node(activated.inputs[0]), "the activation's input is not a projection x W1^T + b1")
    w1 = _weight(graph, up.weight, up.weight_transposed, neuron_dim=0, strict=True)
    b1 = _up_bias(graph, up, w1)
    if w1.idx is not w2.idx:
        raise NoMatch(up.weight, "W1 and W2 are not gathered by the same idx")
    computed = up.nodes + [activated.name] + ([down.input.name] if mask is not None else []) + down.nodes
    _check_private(graph, computed)
    operands = [up.input, w1.tensor] + b1.operands + [w2.tensor] + ([down.bias] if down.bias else [])
    ffn = _check_operands(anchor, operands, w1, w2)
    if mask is not None:
        _check_mask(mask, down.input, activated, ffn)
    layout = SparseMLPLayout("gathered" if mask is None else "masked", has_b1=bool(b1.operands),
                             has_b2=down.bias is not None, w1_transposed=w1.transposed, w2_transposed=w2.transposed,
                             indices_proven=mask is not None or _indices_in_range(graph, w2.idx, ffn),
                             mask_keeps=mask_keeps)
    replaced = _in_order(graph, computed + w1.nodes + b1.nodes + w2.nodes)
    op = SparseMLPOp(replaced, _activation_name(activated), layout, mode=context.mode)
    op.prepare()
    selector = w2.idx if mask is None else mask
    context.fuse(graph, anchor, op, [n.name for n in operands + [selector]], replaced,
                 f"{layout.describe()}, {op.activation}")


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


def _check_private(graph, computed: list[str]) -> None:
    """The dense intermediates (projection, activation, masked product) must not be read elsewhere."""
    inside = set(computed)
    for name in computed[:-1]:
        outside = [user.name for user in graph.users(name) if user.name not in inside]
        if outside:
            raise NoMatch(graph.node(name), f"intermediate is also read by {outside[0]}")


def _check_operands(anchor: Node, operands: list[Node], w1: Weight, w2: Weight):
    """Dtypes and weight shapes the kernels take; returns the number of neurons F."""
    dtype = anchor.type.dtype
    if dtype not in KERNEL_DTYPES:
        raise NoMatch(anchor, f"{dtype} is not supported by the kernels (fp16/bf16/fp32)")
    for node in operands:
        if node.type.dtype != dtype:
            raise NoMatch(node, f"{node.type.dtype} operand in a {dtype} MLP")
    for weight in (w1, w2):
        if weight.tensor.type.rank != 2:
            raise NoMatch(weight.tensor, "the weight is not a matrix")
    ffn_1 = w1.tensor.type.shape[1 if w1.transposed else 0]
    ffn_2 = w2.tensor.type.shape[0 if w2.transposed else 1]
    if ffn_1 != ffn_2:
        raise NoMatch(w2.tensor, f"W1 has {ffn_1} neurons but W2 {ffn_2}")
    return ffn_1


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

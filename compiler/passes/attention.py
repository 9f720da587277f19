"""Attention pass (FlashAttention-2): softmax(Q K^T * s + mask) V becomes one fused kernel.

Recognised (after ir.canonicalize folded the spellings):

    out = matmul(cast?(dropout?(softmax(scores, dim=-1))), V)        naive attention (train-mode dropout on the
                                                                      weights fused, eval-mode dropped earlier;
                                                                      the weights zeroed where the one bool mask
                                                                      dropped scores: rows it drops whole give 0)
    scores = chain over matmul(Q, K^T) of                             (bmm / @ / einsum)
             casts, scales (mul/div by a scalar or a constant 0-d tensor; a tensor, a learned
             temperature or a per-head scale (h, 1, 1), right on QK^T scales q instead),
             at most one tanh between scales (logit soft-capping, cap * tanh(s / cap)),
             at most two masks above it: scores + bias | scores - bias (a bias negated, e.g.
             Funnel's and XLNet's scores - 1e30 * (1 - m)) | where(m, fill, scores) | masked_fill
    out = sdpa(Q, K, V, attn_mask?, dropout_p?, is_causal?, scale?, enable_gqa?)  F.scaled_dot_product_attention
    out, _ = multi_head_attention_forward(...)                        nn.MultiheadAttention (its weights unread)
    out = _transformer_encoder_layer_fwd(...)                         nn.TransformerEncoderLayer's inference fast
                                                                      path: norms and MLP stay in PyTorch

K and V may come through repeat_kv (GQA/MQA); the kernel reads the shared heads directly.
The scores and probabilities may be reshaped on the way when the reshape only regroups the
batch dims ((b*h, L, L) <-> (b, h, L, L), as fairseq, BLOOM and GPT-NeoX's old code do to apply
a 4-d mask to 3-d bmm scores); q and k are then viewed in v's batch dims at run time.
Masks that do not depend on the model's inputs are evaluated at compile time: a causal
mask (top-left or bottom-right aligned) becomes block skipping, an all-pass mask
disappears, anything else stays a mask tensor. Two masks (GPT-2's causal where and then the
padding bias) reach the op as tensors, which it combines into one bias at run time (see
runtime.attention.combined_bias). Masked values at or below MASKED_OUT
(-inf, finfo.min, -1e9...) drop a score exactly: its exp underflows to zero.
Anything else is left to PyTorch and reported as a near-miss naming the node that broke it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from compiler.passes import NoMatch, PassContext
from ir import consteval
from ir.fused import AttentionLayout, EncoderLayout, FusedSpec, MaskForm, MultiheadLayout
from ir.graph import Call, Graph, Node, Ref, StaleRead
from ir.limits import KERNEL_DTYPES, MASKED_OUT, MAX_HEAD_DIM
from ir.match import check_private
from ir.pattern import Any, Op, Skip, match
from ir.types import TensorType

PATTERN = "attention"
MAX_MASKS = 2
NATIVE_LAYERS = {  # PyTorch's fused inference fast paths Dynamo records as one op, left to PyTorch
    "_native_multi_head_attention": "nn.MultiheadAttention's native fast path is one op (left to PyTorch)",
}


def attention_reference(q, k, v, scale: float, bias: torch.Tensor | None = None):
    """Scaled dot-product attention, Vaswani et al. (2017) eq. 1: softmax(Q K^T * s + bias) V."""
    scores = q @ k.transpose(-1, -2) * scale
    return torch.softmax(scores if bias is None else scores + bias, dim=-1) @ v


PROBABILITIES = Skip({"cast", "identity", "reshape", "dropout"}, Op("softmax", Any("scores"), bind="softmax",
                                  where=lambda n: n.attrs["dim"] == n.type.rank - 1,
                                  why="softmax is not over the last (key) dimension"))
NAIVE_ATTENTION = Op("matmul", PROBABILITIES, Any("value"), bind="output")


@dataclass
class MaskOp:
    """One mask found between QK^T and softmax."""

    kind: str  # "additive" | "bool"
    tensor: Node
    keep_when: bool = True
    fill_value: float = -math.inf
    multiplier: float = 1.0
    batch_shape: tuple = ()  # the batch dims of the scores it is applied to


@dataclass(frozen=True)
class StateScale:
    """A scale read from module state (a buffer or tensor attribute): folded in at compile time,
    recomputed at run time when the factor the graph computes differs from `value`."""

    factor: Node  # the scalar the scores are multiplied by (exponent 1) or divided by (-1)
    value: float  # its value at compile time
    exponent: int
    masks_below: int  # masks the walk from the softmax met before it (applied after it); later ones it scales


@dataclass(frozen=True)
class Scores:
    """What the walk from the softmax input down to QK^T has collected (qk once it arrives)."""

    qk: Node | None = None
    scale: float = 1.0
    masks: tuple = ()  # MaskOps from the softmax down: the outermost first
    nodes: tuple = ()
    regrouped: bool = False  # a reshape between QK^T and softmax regroups the batch dims
    state_scales: tuple = ()  # StateScales
    softcap: float | None = None  # scores = softcap * tanh(scale * QK^T) below the masks
    query_scales: tuple = ()  # (op, factor node): a tensor scale per batch entry, applied to q instead


def run(graph: Graph, context: PassContext) -> None:
    def try_fuse(node: Node) -> None:
        if node.op == "sdpa":
            _fuse_sdpa(graph, node, context)
        elif node.op == "mha":
            _fuse_multihead(graph, node, context)
        elif node.op == "encoder_layer":
            _fuse_encoder_layer(graph, node, context)
        elif node.op == "torch" and node.attrs["target"] in NATIVE_LAYERS:
            raise NoMatch(node, NATIVE_LAYERS[node.attrs["target"]])
        elif node.op == "matmul":
            _fuse_naive(graph, node, context)

    context.for_each_candidate(PATTERN, graph, list(graph), try_fuse)


# -- naive attention -------------------------------------------------------------------
def _fuse_naive(graph: Graph, node: Node, context: PassContext) -> None:
    zeroing = _zeroing(graph, graph.node(node.inputs[0]))
    found = match(NAIVE_ATTENTION, graph, node) if zeroing is None else \
        match(PROBABILITIES, graph, graph.node(zeroing.inputs[1]))
    if not found:
        if graph.node(found.node).op == "softmax":
            raise NoMatch(graph.node(found.node), found.reason)
        _explain_probabilities(graph, node)
        return
    scores = _parse_scores(graph, found["scores"], context, Scores())
    if scores.softcap is not None and scores.state_scales:
        raise NoMatch(scores.qk, "a scale read from module state inside a softcap's tanh")
    if zeroing is not None:
        scores = replace(scores, masks=_zeroed_masks(zeroing, scores.masks))
    probabilities = _probability_chain(graph, node, found["softmax"])
    dropout_p = _dropout_on(graph, probabilities)
    replaced = list(scores.nodes[::-1]) + probabilities
    check_private(graph, replaced[:-1], set(replaced),
                  "intermediate is also read by {reader} (e.g. returned attention weights)")
    query, key_t = (graph.node(name) for name in scores.qk.inputs[:2])
    key, key_transposed = _untranspose(graph, key_t)
    value = graph.node(node.inputs[1])
    query, key = (_under_upcast(graph, operand, value) for operand in (query, key))
    if scores.query_scales:
        if query.name != scores.qk.inputs[0]:
            raise NoMatch(scores.query_scales[0][1], "a tensor scale on QK^T computed in fp32 from half-precision q")
        query = _scaled_query(graph, query, scores.query_scales, scores.qk)
    regrouped = scores.regrouped or any(graph.node(name).op == "reshape" for name in probabilities)
    _fuse(graph, node, context, query, key, value, scores.scale, list(scores.masks[::-1]),
          key_transposed=key_transposed, causal=None, empty_rows_zero=zeroing is not None, replaced=replaced,
          regrouped=regrouped,
          state_scales=scores.state_scales, softcap=scores.softcap, dropout_p=dropout_p)


def _regroups_batch(graph, node: Node) -> bool:
    """Does reshape `node` keep the last two (query, key) dims and regroup only the batch dims?"""
    source = graph.node(node.inputs[0])
    if node.type is None or source.type is None or min(node.type.rank, source.type.rank) < 2:
        return False
    shape, source_shape = node.type.static_shape(), source.type.static_shape()
    if shape is None or source_shape is None:
        raise NoMatch(node, "scores are reshaped with symbolic sizes")
    return shape[-2:] == source_shape[-2:] and math.prod(shape[:-2]) == math.prod(source_shape[:-2])


def _probability_chain(graph, output: Node, softmax: Node) -> list[str]:
    """softmax, the casts/copies (and a zeroing where) after it, and the output matmul, in dataflow order."""
    chain = [output.name]
    current = graph.node(output.inputs[0])
    while current is not softmax:
        if current.op == "reshape" and not _regroups_batch(graph, current):
            raise NoMatch(current, "probabilities are reshaped beyond regrouping the batch dims")
        chain.append(current.name)
        current = graph.node(_probability_input(current))
    return [softmax.name] + chain[::-1]


def _probability_input(node: Node) -> str:
    """The probabilities a node after the softmax reads: where(c, scalar, p)'s p, else its first input."""
    return node.inputs[1] if node.op == "where" and len(node.inputs) == 2 else node.inputs[0]


def _zeroing(graph, node: Node) -> Node | None:
    """`node` when it zeroes probabilities where a bool condition says (DeBERTa's XSoftmax:
    softmax(s.masked_fill(m, min)).masked_fill(m, 0)), the probabilities its second input."""
    if node.op != "where" or len(node.inputs) != 2 or graph.node(node.inputs[0]).type.dtype != torch.bool:
        return None
    return node if (node.attrs["then_scalar"], node.attrs["else_scalar"]).count(0) == 1 else None


def _zeroed_masks(zeroing: Node, masks: tuple) -> tuple:
    """Zeroing the weights where the one mask dropped the scores changes only rows it drops whole, to
    zeros: the mask with a fill of -inf, which the kernel (empty_rows_zero) gives zeros for. A fill at
    or below MASKED_OUT drops the other rows' scores exactly either way. Anything else is left to PyTorch."""
    keep_when = zeroing.attrs["then_scalar"] is None
    same = len(masks) == 1 and masks[0].kind == "bool" and masks[0].tensor.name == zeroing.inputs[0] \
        and masks[0].keep_when == keep_when and masks[0].fill_value <= MASKED_OUT
    if not same:
        raise NoMatch(zeroing, "probabilities zeroed after softmax other than where the one bool mask dropped scores")
    return (replace(masks[0], fill_value=-math.inf),)


def _dropout_on(graph, probabilities: list[str]) -> float:
    """The probability of the train-mode dropout on the weights (0.0 without one)."""
    dropouts = [graph.node(name) for name in probabilities if graph.node(name).op == "dropout"]
    if len(dropouts) > 1:
        raise NoMatch(dropouts[1], "dropout applied twice to the attention weights")
    return _dropout_p(dropouts[0], dropouts[0].attrs["p"]) if dropouts else 0.0


def _dropout_p(node: Node, p) -> float:
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise NoMatch(node, f"dropout p={p} is not a probability below 1")
    return float(p)


def _explain_probabilities(graph: Graph, node: Node) -> None:
    """A matmul fed by softmax through something we cannot skip is a near-miss, not a non-match."""
    reasons = {"mul": "probabilities are rescaled after softmax",
               "where": "probabilities are masked after softmax (a where or masked_fill between it and the matmul)",
               "permute": "probabilities are permuted after softmax (scores laid out other than (..., queries, keys), "
                          "e.g. DeepSeek's einsum 'bshd,bthd->bsht')",
               "slice": "probabilities are sliced after softmax (e.g. attention sinks: extra logits in the softmax)"}
    current, blocker = graph.node(node.inputs[0]), None
    while current.op in ("cast", "identity", "dropout", *reasons) and current.inputs:
        if current.op in reasons:
            blocker = blocker or current
        current = graph.node(_probability_input(current))
        if current.op == "softmax" and blocker is not None:
            raise NoMatch(blocker, reasons[blocker.op])


def _parse_scores(graph, node: Node, context, walk: Scores) -> Scores:
    """Walk from the softmax input down to QK^T, collecting scales and at most MAX_MASKS masks."""
    walk = replace(walk, nodes=walk.nodes + (node.name,))
    below = graph.node(node.inputs[0]) if node.inputs else None
    if node.op == "matmul":
        return replace(walk, qk=node)
    if node.op in ("cast", "identity"):
        return _parse_scores(graph, below, context, walk)
    if node.op == "reshape" and _regroups_batch(graph, node):
        return _parse_scores(graph, below, context, replace(walk, regrouped=True))
    if node.op in ("mul", "div"):
        try:
            scores, factor, state_scale = _scale_operands(graph, node, context, len(walk.masks))
        except NoMatch:
            scores, factor_node = _query_scale(graph, node) or (None, None)
            if scores is None:
                raise
            return _parse_scores(graph, scores, context, replace(walk, query_scales=walk.query_scales + (
                (node.op, factor_node),)))
        walk = replace(walk, scale=walk.scale * factor, state_scales=walk.state_scales + state_scale)
        return _parse_scores(graph, scores, context, walk)
    if node.op == "add" and (scores := _zero_added(graph, node)) is not None:
        return _parse_scores(graph, scores, context, walk)
    if node.op == "tanh":
        return _parse_softcap(graph, node, context, walk)
    if node.op in ("add", "sub", "where"):
        if walk.softcap is not None:
            raise NoMatch(node, "a mask under the softcap's tanh (the kernel masks after capping)")
        if len(walk.masks) == MAX_MASKS:
            raise NoMatch(node, f"more than {MAX_MASKS} masks between QK^T and softmax")
        return _parse_masked(graph, node, context, walk)
    if node.op == "placeholder":
        raise NoMatch(node, "the scores are an input of this graph: TorchDynamo broke the graph under the softmax "
                            "(GPT-NeoX's tensor baddbmm alpha, a .item(), print...), so QK^T is not in it")
    what = node.attrs["target"] if node.op == "torch" else node.op
    raise NoMatch(node, f"{what} between QK^T and softmax is neither a scale nor a mask")


def _parse_softcap(graph, node: Node, context, walk: Scores) -> Scores:
    """Logit soft-capping, cap * tanh(s / cap) (Gemma 2, Grok): the scales collected above the
    tanh multiply its output and become the cap; those below it scale QK^T inside the tanh."""
    if walk.softcap is not None:
        raise NoMatch(node, "tanh applied twice between QK^T and softmax")
    if walk.state_scales:
        raise NoMatch(node, "a scale read from module state multiplies a softcap's tanh")
    return _parse_scores(graph, graph.node(node.inputs[0]), context, replace(walk, softcap=walk.scale, scale=1.0))


def _zero_added(graph, node: Node) -> Node | None:
    """x when `node` adds compile-time zeros to x (baddbmm into torch.zeros, GPT-NeoX), else None."""
    if len(node.inputs) != 2:
        return None
    for kept, added in (node.inputs, node.inputs[::-1]):
        x, zeros = graph.node(kept), graph.node(added)
        if zeros.type is None or x.type is None or tuple(zeros.type.shape) != tuple(x.type.shape):
            continue
        value = consteval.evaluate(graph, zeros, {})
        if value is not None and not torch.any(value):
            return x
    return None


def _scale_operands(graph, node: Node, context, masks_below: int) -> tuple[Node, float, tuple]:
    """(the scores, the factor, (StateScale,) when the factor is read from module state, else ())."""
    scalar = node.attrs.get("scalar")
    if scalar is not None and len(node.inputs) == 1:
        if node.op == "div" and (node.attrs["scalar_first"] or scalar == 0):
            raise NoMatch(node, "scores divide a scalar" if node.attrs["scalar_first"] else "scores divided by zero")
        return graph.node(node.inputs[0]), (1.0 / scalar if node.op == "div" else float(scalar)), ()
    if len(node.inputs) == 2:
        first, second = (graph.node(name) for name in node.inputs)
        candidates = [(first, second)] if node.op == "div" else [(first, second), (second, first)]
        for scores, factor_node in candidates:
            factor = _constant_scalar(graph, factor_node, context.pinned)
            if factor is None or not math.isfinite(factor) or factor == 0:
                continue
            exponent = -1 if node.op == "div" else 1
            state = consteval.pinned_dependencies(graph, factor_node, context.pinned)
            return scores, factor ** exponent, ((StateScale(factor_node, factor, exponent, masks_below),) if state else ())
    raise NoMatch(node, f"scores {node.op} by a tensor that is not a compile-time scalar")


def _query_scale(graph, node: Node) -> tuple[Node, Node] | None:
    """(scores, factor) when `node` scales QK^T, through casts and scalar scales only (no mask, reshape
    or tanh), by a tensor constant over the query and key dims that q takes without changing shape or
    dtype: a learned temperature, Swin v2's per-head logit scale (h, 1, 1). s * f = (q * f) K^T."""
    first, second = (graph.node(name) for name in node.inputs) if len(node.inputs) == 2 else (None, None)
    for scores, factor in [(first, second)] if node.op == "div" else [(first, second), (second, first)]:
        below = scores
        while below is not None and (below.op in ("cast", "identity") or (
                below.op in ("mul", "div") and len(below.inputs) == 1)):
            below = graph.node(below.inputs[0])
        query = graph.node(below.inputs[0]) if below is not None and below.op == "matmul" else None
        if query is None or factor.type is None or query.type is None or factor.type.static_shape() is None:
            continue
        shape = factor.value.shape
        if (shape[-2:] == (1, 1) or not shape) and factor.type.dtype == query.type.dtype == node.type.dtype \
                and torch.broadcast_shapes(shape, query.value.shape) == query.value.shape:
            return scores, factor
    return None


def _scaled_query(graph, query: Node, scales: tuple, anchor: Node) -> Node:
    """query * f (or / f) for each (op, f) of `scales`: new nodes ordered with `anchor`, QK^T."""
    for op, factor in scales:
        function = torch.mul if op == "mul" else torch.div
        query = graph.add(Node(name=graph.fresh_name(f"{query.name}_{op}"), op="torch", inputs=[query.name, factor.name],
                               attrs={"target": op}, type=query.type, value=function(query.value, factor.value),
                               call=Call("call_function", function, (Ref(0), Ref(1))), order=anchor.order))
    return query


def _constant_scalar(graph, node: Node, pinned: dict | None = None) -> float | None:
    if node.type is None or node.type.static_shape() is None or math.prod(node.type.static_shape()) != 1:
        return None
    value = consteval.evaluate(graph, node, pinned or {})
    return None if value is None else float(value.reshape(()).item())


def _parse_masked(graph, node: Node, context, walk: Scores) -> Scores:
    failure: NoMatch | None = None
    for scores_name, mask in _mask_readings(graph, node, context, walk.scale):
        mask.batch_shape = tuple(node.type.shape[:-2])
        try:
            return _parse_scores(graph, graph.node(scores_name), context, replace(walk, masks=walk.masks + (mask,)))
        except NoMatch as miss:
            failure = failure or miss
    raise failure or NoMatch(node, f"{node.op} is not a mask the kernel supports")


def _mask_readings(graph, node: Node, context, multiplier: float):
    """Each (scores input, MaskOp) way to read `node` as a mask applied to scores."""
    if multiplier <= 0:
        raise NoMatch(node, "mask followed by a non-positive scale")
    if node.op == "add" and len(node.inputs) == 2:
        for scores, bias in (node.inputs, node.inputs[::-1]):
            bias_node = graph.node(bias)
            if bias_node.type is not None and bias_node.type.dtype.is_floating_point:
                yield scores, MaskOp("additive", bias_node, multiplier=multiplier)
        return
    if node.op == "sub" and len(node.inputs) == 2:
        scores, subtracted = node.inputs
        if graph.node(subtracted).type is not None and graph.node(subtracted).type.dtype.is_floating_point:
            yield scores, MaskOp("additive", _negated(graph, node, graph.node(subtracted)), multiplier=multiplier)
        return
    if node.op == "where":
        condition = graph.node(node.inputs[0])
        if condition.type.dtype != torch.bool:
            raise NoMatch(node, "where/masked_fill with a non-bool condition")
        for scores, keep_when, fill in _where_branches(graph, node, context):
            yield scores, MaskOp("bool", condition, keep_when, fill * multiplier)
        return
    raise NoMatch(node, f"{node.op} with a scalar is not a mask")


def _negated(graph, anchor: Node, bias: Node) -> Node:
    """A new node -bias, so that scores - bias reads as the additive mask scores + (-bias); nothing
    reads it when the match fails, and dead code removes it."""
    value = -bias.value
    negated = Node(name=graph.fresh_name(f"{bias.name}_negated"), op="mul", inputs=[bias.name],
                   attrs={"scalar": -1.0, "scalar_first": False}, type=TensorType.of(value), value=value,
                   order=anchor.order)
    try:
        return graph.add(negated)
    except StaleRead:
        raise NoMatch(anchor, "the subtracted mask is written in place before the scores read it") from None


def _where_branches(graph, node: Node, context):
    """Each (scores input, keep_when, fill) reading of where(condition, then, else).

    One branch is the fill: a Python scalar, or a compile-time constant tensor with a single
    element (GPT-2's and GPT-NeoX's `torch.full([], finfo.min)` / `torch.tensor(min)`).
    """
    then_scalar, else_scalar = node.attrs["then_scalar"], node.attrs["else_scalar"]
    if len(node.inputs) == 2:
        fill = then_scalar if then_scalar is not None else else_scalar
        yield node.inputs[1], then_scalar is None, float(fill)
        return
    then_name, else_name = node.inputs[1:]
    for scores, fill_name, keep_when in ((else_name, then_name, False), (then_name, else_name, True)):
        fill = _constant_scalar(graph, graph.node(fill_name))
        if fill is not None:
            yield scores, keep_when, fill
            return
    raise NoMatch(node, "where with two tensor branches, neither a constant fill")


def _under_upcast(graph, node: Node, value: Node) -> Node:
    """x when `node` casts x, of v's half-precision dtype, up to float32 (GPT-J computes QK^T in
    fp32): the kernel's QK^T accumulates the same products in fp32; else `node`."""
    source = graph.node(node.inputs[0]) if node.op == "cast" and node.type.dtype == torch.float32 else None
    if source is not None and source.type is not None and source.type.dtype in (torch.float16, torch.bfloat16) \
            and source.type.dtype == value.type.dtype:
        return source
    return node


def _untranspose(graph, key_t: Node) -> tuple[Node, bool]:
    """K from K^T when K^T is a transpose of the last two dims; else keep K^T, transposed at run time."""
    perm = key_t.attrs.get("perm") if key_t.op == "permute" else None
    if perm is not None and len(perm) >= 2:
        swapped = tuple(range(len(perm) - 2)) + (len(perm) - 1, len(perm) - 2)
        if perm == swapped:
            return graph.node(key_t.inputs[0]), False
    return key_t, True


# -- F.scaled_dot_product_attention ---------------------------------------------------
def _fuse_sdpa(graph: Graph, node: Node, context: PassContext) -> None:
    attrs = node.attrs
    if attrs["is_causal"] and attrs["has_mask"]:
        raise NoMatch(node, "is_causal together with attn_mask")
    query, key, value = (graph.node(name) for name in node.inputs[:3])
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(int(query.type.shape[-1]))
    masks = []
    if attrs["has_mask"]:
        tensor = graph.node(node.inputs[3])
        masks.append(MaskOp("bool", tensor) if tensor.type.dtype == torch.bool else MaskOp("additive", tensor))
    _fuse(graph, node, context, query, key, value, float(scale), masks,
          key_transposed=False, causal="top_left" if attrs["is_causal"] else None,
          empty_rows_zero=True, replaced=[node.name], dropout_p=_dropout_p(node, attrs["dropout_p"]))


# -- nn.MultiheadAttention ----------------------------------------------------------------
def _fuse_multihead(graph: Graph, node: Node, context: PassContext) -> None:
    attrs = node.attrs
    if attrs["unsupported"]:
        raise NoMatch(node, f"multi-head attention with {', '.join(attrs['unsupported'])}")
    dropout_p = _dropout_p(node, attrs["dropout_p"]) if attrs["training"] else 0.0
    for user in graph.users(node.name):
        if not (user.op == "torch" and user.attrs["target"] == "getitem" and user.call.args[1] == 0):
            raise NoMatch(user, "the attention weights are read (need_weights): the kernel does not form them")
    operands = dict(zip(attrs["roles"], (graph.node(name) for name in node.inputs)))
    query, out = operands["query"], node.value[0]
    if query.type.dtype not in KERNEL_DTYPES or query.type.rank not in (2, 3):
        raise NoMatch(query, f"query of dtype {query.type.dtype} and rank {query.type.rank}")
    head_dim = int(query.type.shape[-1]) // attrs["num_heads"]
    if head_dim > MAX_HEAD_DIM:
        raise NoMatch(node, f"head dim {head_dim} exceeds the kernel's {MAX_HEAD_DIM}")
    static_form, tensor_form = _multihead_forms(attrs, operands)
    layout = MultiheadLayout(attrs["roles"], attrs["num_heads"], attrs["need_weights"])
    masks_require_grad = any(_requires_grad(operands[role]) for role in ("attn_mask", "key_padding_mask")
                             if role in operands)
    spec = FusedSpec(PATTERN, dict(layout=layout, head_dim=head_dim, out_dtype=out.dtype, static_form=static_form,
                                   tensor_form=tensor_form, dropout_p=dropout_p, masks_require_grad=masks_require_grad),
                     example=tuple(_heads_view(operands[role].value, attrs["num_heads"])
                                   for role in ("query", "key", "value")), op="multihead_attention")
    context.fuse(graph, node, spec, list(node.inputs), [node.name],
                 f"nn.MultiheadAttention, {attrs['num_heads']} heads: {(static_form or tensor_form).describe()}"
                 + _dropout_detail(dropout_p))


def _fuse_encoder_layer(graph: Graph, node: Node, context: PassContext) -> None:
    attrs = node.attrs
    operands = dict(zip(attrs["roles"], (graph.node(name) for name in node.inputs)))
    src = operands["src"]
    if src.type.dtype not in KERNEL_DTYPES or src.type.rank != 3 or attrs["mask_type"] not in (None, 1, 2):
        raise NoMatch(src, f"encoder layer input of dtype {src.type.dtype}, rank {src.type.rank}, "
                           f"mask type {attrs['mask_type']}")
    head_dim = int(src.type.shape[-1]) // attrs["num_heads"]
    if head_dim > MAX_HEAD_DIM:
        raise NoMatch(node, f"head dim {head_dim} exceeds the kernel's {MAX_HEAD_DIM}")
    masked = "mask" in operands
    static_form = None if masked else MaskForm()  # the native layer gives fully masked rows NaN
    tensor_form = MaskForm(kind="additive") if masked else None
    layer = EncoderLayout(attrs["roles"], attrs["num_heads"], attrs["use_gelu"], attrs["norm_first"], attrs["eps"],
                          attrs["mask_type"] if masked else None)
    sequence_first = src.value.transpose(0, 1)
    spec = FusedSpec(PATTERN, dict(layer=layer, head_dim=head_dim, out_dtype=src.type.dtype, static_form=static_form,
                                   tensor_form=tensor_form),
                     example=(_heads_view(sequence_first, attrs["num_heads"]),) * 3, op="transformer_encoder_layer")
    context.fuse(graph, node, spec, list(node.inputs), [node.name],
                 f"nn.TransformerEncoderLayer fast path, {attrs['num_heads']} heads: "
                 f"{(static_form or tensor_form).describe()}")


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """A meta tensor shaped like x (L, N, E) or (L, E) once projected and split into heads: (N, heads, L, E/heads)."""
    length, batch = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
    return torch.empty(batch, heads, length, x.shape[-1] // heads, dtype=x.dtype, device="meta")


def _multihead_forms(attrs, operands) -> tuple[MaskForm | None, MaskForm | None]:
    """(static form, tensor form) as F.multi_head_attention_forward applies its masks: is_causal
    trusts attn_mask to be causal only on its SDPA path without a key padding mask; otherwise
    both masks merge into one additive mask (bool ones as -inf where True)."""
    empty_rows_zero = not attrs["need_weights"]
    padding = "key_padding_mask" in operands
    if attrs["is_causal"] and not padding and not attrs["need_weights"]:
        return MaskForm(causal="top_left", empty_rows_zero=True), None
    if padding or "attn_mask" in operands:
        return None, MaskForm(kind="additive", empty_rows_zero=empty_rows_zero)
    return MaskForm(empty_rows_zero=empty_rows_zero), None


# -- shared ------------------------------------------------------------------------------
def _fuse(graph, anchor: Node, context, query, key, value, scale, masks: list[MaskOp], *,
          key_transposed: bool, causal: str | None, empty_rows_zero: bool, replaced: list[str],
          regrouped: bool = False, state_scales: tuple = (), softcap: float | None = None,
          dropout_p: float = 0.0) -> None:
    """Replace `anchor` by a fused attention node; `masks` in the order they apply (the innermost first)."""
    if regrouped:
        batch = _check_regrouped(anchor, query, key, value)
        mask_batches = tuple(mask.batch_shape if mask.batch_shape != batch else None for mask in masks)
    else:
        key, value = _strip_repeat_kv(graph, key, value)
        batch, mask_batches = None, ()
    _check_operands(anchor, query, key, value, key_transposed, batch)
    scalings = _mask_scalings(state_scales, len(masks))
    if len(masks) > 1:
        static_form, tensor_form = None, _mask_chain(masks, causal, empty_rows_zero)
        extra_inputs, state, folded_mask = [mask.tensor.name for mask in masks], [], None
    else:
        static_form, tensor_form, extra_inputs, state, folded_mask = _mask_forms(
            graph, anchor, context, query, key, masks[0] if masks else None, key_transposed, causal, empty_rows_zero,
            scaled=any(scalings))
    layout = AttentionLayout(key_transposed=key_transposed, out_dtype=anchor.type.dtype,
                             regroup_qk=regrouped, mask_batches=mask_batches)
    scale_state = sorted({name for scale in state_scales
                          for name in consteval.pinned_dependencies(graph, scale.factor, context.pinned)})
    scaled_static = folded_mask is not None and any(scalings)
    static_dropped = _dropped_at_most(folded_mask, masks[0]) if scaled_static else -math.inf
    spec = FusedSpec(PATTERN, dict(
        scale=scale, layout=layout, static_form=static_form, tensor_form=tensor_form, folded_mask=folded_mask,
        scale_factors=tuple((scale.value, scale.exponent) for scale in state_scales), softcap=softcap,
        mask_scalings=scalings, static_dropped=static_dropped, dropout_p=dropout_p,
        masks_require_grad=any(_requires_grad(graph.node(name)) for name in extra_inputs)),
        example=(query.value, key.value, value.value))
    detail = (static_form or tensor_form).describe()
    if softcap is not None:
        detail += f"; scores soft-capped: {softcap:.6g} * tanh({scale:.6g} * QK^T)"
    if static_form is not None and tensor_form is not None:
        detail += (f" while {'buffers ' + ', '.join(state) if state else 'the scale'} give the mask they gave at "
                   f"compile time (checked each call), else {tensor_form.describe()}")
    if scale_state:
        detail += f"; scale {scale:.6g} from {', '.join(scale_state)}, re-read when they change (checked each call)"
    if any(scalings):
        detail += "; it scales the mask too, as eager does (exact while positive, else in PyTorch)"
    detail += _dropout_detail(dropout_p)
    extra_inputs += [scale.factor.name for scale in state_scales]
    context.fuse(graph, anchor, spec, [query.name, key.name, value.name] + extra_inputs, replaced, detail)


def _requires_grad(node: Node) -> bool:
    """Does the tensor (a learned bias) require grad? Fixed at compile time: TorchDynamo guards it."""
    return isinstance(node.value, torch.Tensor) and node.value.requires_grad


def _dropout_detail(dropout_p: float) -> str:
    return f"; dropout p={dropout_p:g} on the weights (Philox in the kernels)" if dropout_p else ""


def _strip_repeat_kv(graph, key: Node, value: Node) -> tuple[Node, Node]:
    if key.op == "repeat_kv" and value.op == "repeat_kv" and key.attrs["repeats"] == value.attrs["repeats"]:
        return graph.node(key.inputs[0]), graph.node(value.inputs[0])
    return key, value


def _check_regrouped(anchor: Node, query: Node, key: Node, value: Node) -> tuple:
    """The batch dims q and k are viewed in when the scores are regrouped: v's, which the output has."""
    shapes = [node.type.static_shape() if node.type is not None else None for node in (query, key, value, anchor)]
    if any(shape is None for shape in shapes):
        raise NoMatch(anchor, "regrouped scores with symbolic sizes")
    q_shape, k_shape, v_shape, out_shape = shapes
    if q_shape[:-2] != k_shape[:-2] or v_shape[:-2] != out_shape[:-2] or \
            math.prod(q_shape[:-2]) != math.prod(v_shape[:-2]):
        raise NoMatch(anchor, f"scores regrouped from q/k batch dims {q_shape[:-2]} to v's {v_shape[:-2]}, "
                              "which do not correspond one to one")
    return tuple(v_shape[:-2])


def _check_operands(anchor: Node, query: Node, key: Node, value: Node, key_transposed: bool,
                    batch: tuple | None) -> None:
    """Dtypes and shapes the kernel takes; with `batch`, q and k as viewed in those batch dims."""
    for name, node in (("query", query), ("key", key), ("value", value)):
        if node.type is None or not 2 <= node.type.rank <= 4:
            raise NoMatch(node, f"{name} must be a tensor of rank 2 to 4")
        if node.type.dtype not in KERNEL_DTYPES:
            raise NoMatch(node, f"{name} dtype {node.type.dtype} is not supported by the kernel (fp16/bf16/fp32)")
    if len({query.type.dtype, key.type.dtype, value.type.dtype}) != 1:
        raise NoMatch(anchor, "query, key and value have different dtypes")
    if batch is None and len({query.type.rank, key.type.rank, value.type.rank}) != 1:
        raise NoMatch(anchor, "query, key and value have different ranks")
    k_shape = list(key.type.shape)
    if key_transposed:
        k_shape[-1], k_shape[-2] = k_shape[-2], k_shape[-1]
    q_shape, v_shape = tuple(query.type.shape), tuple(value.type.shape)
    if batch is not None:
        q_shape, k_shape = batch + q_shape[-2:], list(batch) + k_shape[-2:]
    if q_shape[-1] != k_shape[-1] or k_shape[-2] != v_shape[-2]:
        raise NoMatch(anchor, "head dims of query/key or lengths of key/value differ")
    if max(q_shape[-1], v_shape[-1]) > MAX_HEAD_DIM:
        raise NoMatch(anchor, f"head dim {max(q_shape[-1], v_shape[-1])} exceeds the kernel's {MAX_HEAD_DIM}")
    if q_shape[:-3] != tuple(k_shape[:-3]) or tuple(k_shape[:-2]) != v_shape[:-2]:
        raise NoMatch(anchor, "batch dims of query, key and value differ (broadcast matmul)")
    if len(q_shape) >= 3:
        heads_q, heads_kv = q_shape[-3], k_shape[-3]
        if (heads_q % heads_kv) != 0:
            raise NoMatch(anchor, f"{heads_q} query heads are not a multiple of {heads_kv} kv heads")


def _mask_chain(masks: list[MaskOp], causal, empty_rows_zero) -> MaskForm:
    """The tensor form of several masks applied in turn: combined into one bias at run time, which
    is exact only when every bool mask drops the scores it fills."""
    for mask in masks:
        if mask.kind == "bool" and mask.fill_value > MASKED_OUT:
            raise NoMatch(mask.tensor, f"one of {len(masks)} masks fills scores with {mask.fill_value:g}, which does "
                                       "not drop them: the kernel applies several masks as one bias")
    chain = tuple(MaskForm(kind=mask.kind, keep_when=mask.keep_when, fill_value=mask.fill_value,
                           multiplier=mask.multiplier) for mask in masks)
    return MaskForm(kind="additive", chain=chain, causal=causal, empty_rows_zero=empty_rows_zero)


def _mask_scalings(state_scales: tuple, count: int) -> tuple[tuple[int, ...], ...]:
    """For each of `count` masks in the order they apply, the state scales applied after it (their
    indices): those the walk from the softmax met before the mask."""
    return tuple(tuple(index for index, scale in enumerate(state_scales) if met >= scale.masks_below)
                 for met in reversed(range(count)))


def _dropped_at_most(value: torch.Tensor, mask: MaskOp) -> float:
    """The largest score the mask `value` leaves a score it drops: a bool mask's fill, else the largest
    bias at or below MASKED_OUT (times its multiplier); -inf when it drops none."""
    if mask.kind == "bool":
        return mask.fill_value
    dropped = value[value <= MASKED_OUT]
    return float(dropped.max()) * mask.multiplier if dropped.numel() else -math.inf


def _mask_forms(graph, anchor, context, query, key, mask: MaskOp | None, key_transposed, causal, empty_rows_zero,
                scaled: bool = False):
    """(static_form, tensor_form, extra fused-op inputs, the module state the mask was computed from,
    the mask's value when the static form was read from that state or a scale from module state
    scales it (`scaled`: the op then needs the tensor too), else None) for this mask."""
    base = dict(causal=causal, empty_rows_zero=empty_rows_zero)
    if mask is None:
        return MaskForm(**base), None, [], [], None
    tensor_form = MaskForm(kind=mask.kind, keep_when=mask.keep_when, fill_value=mask.fill_value,
                           multiplier=mask.multiplier, **base)
    value = consteval.evaluate(graph, mask.tensor, context.pinned)
    if value is None:
        return None, tensor_form, [mask.tensor.name], [], None
    lq = int(query.type.shape[-2])
    lk = int(key.type.shape[-1] if key_transposed else key.type.shape[-2])
    alignment = _classify(value, mask, lq, lk)
    if alignment is None:
        return None, tensor_form, [mask.tensor.name], [], None
    static_form = MaskForm(causal=None if alignment == "none" else alignment, empty_rows_zero=empty_rows_zero)
    state = consteval.pinned_dependencies(graph, mask.tensor, context.pinned)
    if not state and not scaled:
        return static_form, None, [], [], None
    return static_form, tensor_form, [mask.tensor.name], state, value


def _classify(value: torch.Tensor, mask: MaskOp, lq: int, lk: int) -> str | None:
    """"none", "top_left" or "bottom_right" when the mask is that exactly; None otherwise."""
    if mask.kind == "additive":
        dropped = value <= MASKED_OUT
        if not torch.all(dropped | (value == 0)):
            return None
    else:
        if mask.fill_value > MASKED_OUT:
            return None
        dropped = value if not mask.keep_when else ~value
    try:
        planes = dropped.expand(*dropped.shape[:-2], lq, lk).reshape(-1, lq, lk)
    except RuntimeError:
        return None
    plane = planes[0]
    if not torch.equal(planes, plane.expand_as(planes)):
        return None
    if not plane.any():
        return "none"
    visible = torch.ones(lq, lk, dtype=torch.bool, device=plane.device)
    for alignment, offset in (("top_left", 0), ("bottom_right", lk - lq)):
        if offset >= 0 and torch.equal(plane, ~visible.tril(offset)):
            return alignment
    return None

"""Run time of the fused attention op: pick the kernel variant, launch it or fall back.

The attention pass hands over everything it proved about the scores

    scores = (q @ k^T) * scale,  masked by one MaskForm,  out = softmax(scores) @ v
    (with a softcap: scores = softcap * tanh((q @ k^T) * scale) before the mask)

A mask the pass could evaluate at compile time becomes a `static_form` (no mask at all,
or causal with block skipping); a mask known only at run time is passed as a tensor and
applied by the `tensor_form`. A static form derived from module buffers (nanoGPT's
registered tril) is only trusted while the mask the graph computes from them equals the one
it was read from (`folded_mask`, compared on every call: writes through `.data`, `.numpy()` or
the storage bypass the version counter); otherwise the op applies that mask tensor. A scale
read from module state is recomputed whenever the factors the graph computes change. Two masks applied in turn
(a causal where, then a padding bias) arrive as two tensors with a `chain` form; the op combines
them into one additive bias (combined_bias), which equals eager wherever a row keeps a clearly
visible key, and runs eager's math in PyTorch for calls where some row does not.

Two kernels compute the same semantics; `uses_decode_kernel` picks one by shape:

    q_len <= DECODE_MAX_Q_LEN and kv_len >= DECODE_MIN_KV_LEN   split-KV decode (flash-decoding)
    otherwise                                                   FlashAttention-2 (prefill)

Short queries give FlashAttention-2's grid, (query tiles, batch * q_heads), about one program per
head, each streaming the whole cache: a few dozen programs for batch 1 on a 132-SM GPU, and each
query head of a GQA group reading its kv head again. The decode kernel packs a group's heads and
queries into one tile and splits the keys across programs; it pays one extra small kernel that
merges the splits, which only a cache of a few hundred keys fails to amortise. 64 queries cover
decoding (1) and speculative-decoding trees (Medusa: up to 64 tokens with a tree mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from codegen import attention as attention_codegen
from codegen import attention_decode as decode_codegen
from runtime import library
from runtime.dispatch import FusedOp, Kernel

DECODE_MAX_Q_LEN = 64
DECODE_MIN_KV_LEN = 256
MASKED_OUT = -6.0e4  # scores at or below this, next to a visible score, get exactly zero weight


def uses_decode_kernel(q_len: int, kv_len: int) -> bool:
    """Whether attention of q_len queries over kv_len keys runs the decode kernel (module docstring)."""
    return q_len <= DECODE_MAX_Q_LEN and kv_len >= DECODE_MIN_KV_LEN


@dataclass(frozen=True)
class MaskForm:
    """How one kernel variant masks the scores."""

    kind: str = "none"  # "none" | "bool" | "additive"
    keep_when: bool = True  # bool masks: keep scores where mask == keep_when
    fill_value: float = -math.inf  # bool masks: value replacing dropped scores
    multiplier: float = 1.0  # additive masks: scales applied after the mask
    causal: str | None = None  # None | "top_left" (SDPA) | "bottom_right" (flash-attn)
    empty_rows_zero: bool = False  # rows with no visible key give 0 (SDPA) instead of NaN (softmax)
    chain: tuple = ()  # several masks applied in turn (each a MaskForm), combined into one additive one

    def describe(self) -> str:
        parts = [f"causal ({self.causal})"] if self.causal else []
        if self.chain:
            parts.append(f"{' then '.join(form.kind for form in self.chain)} masks as one bias")
        elif self.kind != "none":
            parts.append(f"{self.kind} mask")
        return ", ".join(parts) or "no mask"


def combined_bias(masks: list[torch.Tensor], chain: tuple) -> tuple[torch.Tensor, str | None]:
    """One additive bias for masks applied in turn, and why it differs from eager (None if it does not).

    A bool mask's dropped scores become -inf in the bias. Eager gives them fill (plus what later
    masks add) instead: the same zero weight as long as that stays at or below MASKED_OUT and the
    row has a score well above it. A row whose every bias is that low (padding queries that see
    only padding) gets eager's weights only from eager's math."""
    device = masks[0].device
    bias = torch.zeros((), dtype=torch.float32, device=device)
    dropped_at_most = torch.tensor(-math.inf, device=device)  # the largest value eager gives a dropped score
    for mask, form in zip(masks, chain):
        if mask.dtype == torch.bool:
            bias = torch.where(mask == form.keep_when, bias, -math.inf)
            dropped_at_most = dropped_at_most.clamp(min=form.fill_value)
        else:
            added = mask.float() * form.multiplier
            bias = bias + added
            dropped_at_most = dropped_at_most + added.max()
    failures = torch.stack([torch.isnan(bias).any(), ~(dropped_at_most <= MASKED_OUT),
                            (bias.amax(dim=-1) <= MASKED_OUT / 2).any()]).tolist()  # one host sync
    reasons = ("the masks hold NaN", "a dropped score rises above the masked-out level once later masks add to it",
               "a row of the combined masks keeps no clearly visible key")
    return bias, next((reason for reason, failed in zip(reasons, failures) if failed), None)


@dataclass(frozen=True)
class AttentionLayout:
    """Where q/k/v come from in the graph: key given transposed; scores regrouped between batch
    layouts ((b*h, ...) <-> (b, h, ...)) on the way, and the batch dims of the scores each mask was
    written for when they differ from v's (the output's)."""

    key_transposed: bool = False
    out_dtype: torch.dtype = torch.float32
    regroup_qk: bool = False
    mask_batches: tuple = ()  # per mask: None, or the batch dims it was written for


def _regrouped_mask(mask: torch.Tensor, written_for: tuple, batch: tuple) -> torch.Tensor:
    """A mask written for scores with batch dims `written_for`, for the same scores regrouped into
    `batch` dims: only its batch dims are expanded (its own query and key dims stay as they are)."""
    mask = mask.reshape((1,) * max(0, 2 - mask.dim()) + tuple(mask.shape))
    return mask.expand(*written_for, *mask.shape[-2:]).reshape(*batch, *mask.shape[-2:])


def _ratio(value: float, compiled: float, exponent: int) -> float:
    """(value / compiled) ** exponent for an exponent of 1 or -1 (compiled is never zero): inf for a
    zero divisor, as eager's division by a zero scale gives."""
    ratio = value / compiled
    return ratio if exponent == 1 else (1.0 / ratio if ratio else math.inf)


def _rescaled(form: MaskForm, ratio: float) -> MaskForm:
    """`form` with its fill (bool masks) or its multiplier (additive ones) scaled by `ratio`."""
    if ratio == 1:
        return form
    if form.kind == "bool":
        return replace(form, fill_value=form.fill_value * ratio)
    return replace(form, multiplier=form.multiplier * ratio)


class AttentionOp(FusedOp):
    pattern = "attention"

    def __init__(self, replaced, scale: float, layout: AttentionLayout,
                 static_form: MaskForm | None, tensor_form: MaskForm | None,
                 folded_mask: torch.Tensor | None = None, mode: str = "default", scale_factors: tuple = (),
                 softcap: float | None = None, mask_scalings: tuple = (), static_dropped: float = -math.inf):
        super().__init__(tuple(replaced), mode)
        self.scale = scale
        self.softcap = softcap
        self.layout = layout
        self.static_form = static_form
        self.tensor_form = tensor_form
        # the mask the static form was read from (a copy: it may be the module's buffer itself)
        self._folded_mask = None if folded_mask is None else folded_mask.detach().clone()
        # factors (value, exponent) of the scale read from module state, recomputed when they change;
        # per mask, the factors applied after it (mask_scalings), which scale it too, as in eager
        self.scale_exponents = tuple(exponent for _, exponent in scale_factors)
        self._scale_values = [value for value, _ in scale_factors]
        self._compiled = (scale, list(self._scale_values), static_form, tensor_form)
        self.mask_scalings = mask_scalings
        self._static_dropped = static_dropped  # the largest score the static form's mask leaves a dropped one
        self._static_holds = True  # the static form's dropped scores stay dropped at the current scale
        self._inexact_scale: str | None = None  # why the current scale needs eager's math, if it does

    # -- call ------------------------------------------------------------------------
    def forward(self, q, k, v, *rest):
        masks, factors = self._split_rest(rest)
        self._refresh_scale(factors)
        form = self._choose_form(masks)
        out_batch = self._out_batch(q, v)
        q, k, v, masks = self._to_4d(q, k, v, masks)
        mask, inexact = self._mask_operand(masks, form) if form is self.tensor_form else (None, None)
        if mask is not None:
            mask = mask.expand(torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2])))
        reason = (self.why_not_kernel([q, k, v]) or attention_codegen.unsupported_reason(q, k, v, mask) or inexact
                  or self._inexact_scale)
        if reason is None:
            out = self._launch(q, k, v, mask, form)
        else:
            self.fell_back(reason)
            out = self._chain_reference(q, k, v, masks) if form.chain else self._reference(q, k, v, mask, form)
        return self._from_4d(out, out_batch)

    def output_like(self, q, k, v, *rest):
        return torch.empty((*self._out_batch(q, v), q.shape[-2], v.shape[-1]), dtype=self.layout.out_dtype,
                           device=q.device)

    def _split_rest(self, rest):
        """(masks, the scale factors read from module state) from the operands after v."""
        count = 0 if self.tensor_form is None else max(1, len(self.tensor_form.chain))
        return list(rest[:count]), rest[count:]

    def _refresh_scale(self, factors) -> None:
        """Recompute the scale when the factors the graph computed from module state differ from
        those it was computed from (one host sync per factor), and the masks they scale: a bool
        mask's fill and an additive one's multiplier by the same ratio. The static form holds while
        its dropped scores stay at or below MASKED_OUT; a ratio that is not positive and finite
        (a mask no longer dropping, or a scale of inf) leaves the call to eager's math in PyTorch."""
        values = [float(factor) for factor in factors]
        if values == self._scale_values:
            return
        self._scale_values = values
        scale, compiled_values, static_form, tensor_form = self._compiled
        ratios = [_ratio(value, compiled, exponent)
                  for value, compiled, exponent in zip(values, compiled_values, self.scale_exponents)]
        self.scale = scale * math.prod(ratios)
        mask_ratios = [math.prod(ratios[index] for index in scaling) for scaling in self.mask_scalings]
        if tensor_form is not None and mask_ratios:
            tensor_form = (replace(tensor_form, chain=tuple(map(_rescaled, tensor_form.chain, mask_ratios)))
                           if tensor_form.chain else _rescaled(tensor_form, mask_ratios[0]))
        self.tensor_form = tensor_form
        self._static_holds = (not mask_ratios or mask_ratios[0] == 1
                              or self._static_dropped * mask_ratios[0] <= MASKED_OUT)
        usable = math.isfinite(self.scale) and all(math.isfinite(ratio) and ratio > 0 for ratio in mask_ratios)
        self._inexact_scale = None if usable else (
            "a scale read from module state, applied after a mask, is no longer positive and finite: eager's math")

    @staticmethod
    def _mask_operand(masks, form: MaskForm) -> tuple[torch.Tensor, str | None]:
        """(the one mask the kernel applies, why it would differ from eager, or None)."""
        if form.chain:
            return combined_bias(masks, form.chain)
        mask = masks[0]
        return (mask * form.multiplier if form.multiplier != 1.0 else mask), None

    def _choose_form(self, masks) -> MaskForm:
        """The static form while the graph's mask is the one it was read from (one host sync), else the tensor form."""
        if self.static_form is None:
            return self.tensor_form
        if self.tensor_form is None or (self._static_holds and torch.equal(masks[0], self._folded_mask)):
            return self.static_form
        return self.tensor_form

    # -- layout ----------------------------------------------------------------------
    def _to_4d(self, q, k, v, masks):
        """(q, k, v, masks) as 4-d kernel operands. Masks stay broadcast views (a combined chain is
        formed at the masks' own broadcast shape); regrouped scores run in the batch dims the first
        regrouped mask was written for, so that mask needs no copy."""
        if self.layout.key_transposed:
            k = k.transpose(-1, -2)
        out_batch = self._out_batch(q, v)
        written_for = [batch or out_batch for batch in self.layout.mask_batches] or [out_batch] * len(masks)
        batch = next((written for written in written_for if written != out_batch), out_batch)
        if self.layout.regroup_qk:
            q, k, v = (x.reshape(*batch, *x.shape[-2:]) for x in (q, k, v))
        masks = [mask if written == batch else _regrouped_mask(mask, written, batch)
                 for mask, written in zip(masks, written_for)]
        missing = 4 - (len(batch) + 2)
        if self.tensor_form is None or not self.tensor_form.chain:
            masks = [mask.expand(torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2]))) for mask in masks]
        q, k, v = (x[(None,) * missing] for x in (q, k, v))
        return q, k, v, [mask.reshape((1,) * max(0, 4 - mask.dim()) + tuple(mask.shape)) for mask in masks]

    def _out_batch(self, q, v) -> tuple:
        """The batch dims of the graph's output: v's when the scores were regrouped, else q's."""
        return tuple((v if self.layout.regroup_qk else q).shape[:-2])

    def _from_4d(self, out, out_batch: tuple):
        """The kernel's 4-d output in the graph's batch dims (v's)."""
        return out.reshape(*out_batch, *out.shape[-2:])

    # -- kernels ---------------------------------------------------------------------
    def spec_for(self, q, k, v, form: MaskForm) -> attention_codegen.AttentionSpec:
        """The spec of the kernel these 4-d operands run: a DecodeSpec for short queries.

        With symbolic lengths (compile time, dynamic shapes) the choice waits for run time:
        comparing them here would make Dynamo guard on the comparison."""
        lengths = (q.shape[-2], k.shape[-2])
        decode = all(isinstance(n, int) for n in lengths) and uses_decode_kernel(*lengths)
        spec_type = decode_codegen.DecodeSpec if decode else attention_codegen.AttentionSpec
        return spec_type(
            head_dim=q.shape[-1],
            value_dim=v.shape[-1],
            mask=form.kind,
            mask_keep_when=form.keep_when,
            causal=form.causal is not None,
            empty_rows_zero=form.empty_rows_zero,
            softcap=self.softcap is not None,
        )

    def kernel_for(self, spec) -> tuple[object, Kernel]:
        if isinstance(spec, decode_codegen.DecodeSpec):
            return self.load_kernel(spec, decode_codegen.kernel_name, decode_codegen.render_decode)
        return self.load_kernel(spec, attention_codegen.kernel_name, attention_codegen.render_attention)

    def prepare(self, q, k, v) -> None:
        """Generate (render, store, load) the kernels this op will launch for these shapes."""
        q, k, v, _ = self._to_4d(q, k, v, [])
        for form in (self.static_form, self.tensor_form):
            if form is not None:
                self.kernel_for(self.spec_for(q, k, v, form))

    def _causal_offset(self, q, k, form: MaskForm) -> int:
        return k.shape[-2] - q.shape[-2] if form.causal == "bottom_right" else 0

    def _launch(self, q, k, v, mask, form):
        spec = self.spec_for(q, k, v, form)
        module, kernel = self.kernel_for(spec)
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=self.layout.out_dtype, device=q.device)

        def run(config):
            return module.launch(q, k, v, out, scale=self.scale, mask=mask, fill_value=form.fill_value,
                                 causal_offset=self._causal_offset(q, k, form), softcap=self.softcap, config=config)

        lengths, default, candidates = self._tuning(spec, q, k)
        config = self.tuned_config(kernel, lengths, q, default=default, candidates=candidates, run=run)
        return run(config)

    @staticmethod
    def _tuning(spec, q, k):
        """(lengths keying the tuned config, default config, candidate configs) for `spec`'s kernel.

        The decode kernel's config holds a split count, so its key adds the packed rows per kv
        head and the number of (batch, kv head) pairs to the lengths."""
        q_len, kv_len = q.shape[-2], k.shape[-2]
        if isinstance(spec, decode_codegen.DecodeSpec):
            shape = dict(group=q.shape[1] // k.shape[1], kv_rows=q.shape[0] * k.shape[1],
                         sm_count=decode_codegen.sm_count(q.device))
            return ((shape["group"] * q_len, kv_len, shape["kv_rows"]),
                    lambda: decode_codegen.default_config(spec, q_len, kv_len, itemsize=q.element_size(), **shape),
                    lambda: decode_codegen.config_space(spec, q_len, kv_len, **shape))
        return ((q_len, kv_len),
                lambda: attention_codegen.default_config(spec, q_len, kv_len, itemsize=q.element_size()),
                lambda: attention_codegen.config_space(spec))

    def _chain_reference(self, q, k, v, masks):
        """Eager's math for masks applied in turn: a bool mask replaces scores by its fill, an
        additive one adds to them (scaled by what follows it)."""
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = attention_codegen.capped_scores(q, k, self.scale, self.softcap)
        for mask, form in zip(masks, self.tensor_form.chain):
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask != form.keep_when, form.fill_value)
            else:
                scores = scores + mask.to(scores.dtype) * form.multiplier
        return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v).to(self.layout.out_dtype)

    def _reference(self, q, k, v, mask, form):
        out = attention_codegen.attention_reference(
            q, k, v,
            scale=self.scale,
            mask=mask,
            mask_keep_when=form.keep_when,
            fill_value=form.fill_value,
            causal=form.causal is not None,
            causal_offset=self._causal_offset(q, k, form),
            empty_rows_zero=form.empty_rows_zero,
            softcap=self.softcap,
        )
        return out.to(self.layout.out_dtype)


@dataclass(frozen=True)
class MultiheadLayout:
    """Which of F.multi_head_attention_forward's tensors the graph passes (`roles`, in order), its head
    count, and whether its attention weights path (need_weights: softmax rows of -inf give NaN) or
    its SDPA path (they give 0) is the one to match."""

    roles: tuple[str, ...]
    num_heads: int
    need_weights: bool


class MultiheadAttentionOp(AttentionOp):
    """F.multi_head_attention_forward (nn.MultiheadAttention) without dropout, bias_k/bias_v, static
    keys or zero attention: the projections run in PyTorch as eager writes them, the attention in
    the generated kernel, on the same mask eager merges from key_padding_mask and attn_mask."""

    def __init__(self, replaced, layout: MultiheadLayout, head_dim: int, out_dtype: torch.dtype,
                 static_form: MaskForm | None, tensor_form: MaskForm | None, mode: str = "default"):
        super().__init__(replaced, 1.0 / math.sqrt(head_dim), AttentionLayout(out_dtype=out_dtype),
                         static_form, tensor_form, mode=mode)
        self.heads = layout

    library_op = "multihead_attention"
    graph_output = staticmethod(library.with_no_weights)  # forward returns the output; the graph, (output, None)

    def output_like(self, *tensors):
        operands = dict(zip(self.heads.roles, tensors))
        query, weight = operands["query"], operands["out_proj_weight"]
        return torch.empty((*query.shape[:-1], weight.shape[0]), dtype=query.dtype, device=query.device)

    def forward(self, *tensors):
        operands = dict(zip(self.heads.roles, tensors))
        query = operands["query"]
        batched = query.dim() == 3
        if not batched:
            operands = {role: self._batched(role, tensor) for role, tensor in operands.items()}
        q, k, v = self._projections(operands)
        masks = [] if self.tensor_form is None else [self._merged_mask(operands, q.shape[0], q.shape[2], k.shape[2])]
        out = super().forward(q, k, v, *masks)
        tgt_len, bsz, embed_dim = operands["query"].shape
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, operands["out_proj_weight"], operands.get("out_proj_bias")).view(tgt_len, bsz, -1)
        return out if batched else out.squeeze(1)

    @staticmethod
    def _batched(role: str, tensor: torch.Tensor) -> torch.Tensor:
        """Unbatched inputs as eager treats them: a batch of one (dim 1 of (L, E) tensors, dim 0 of masks)."""
        if role in ("query", "key", "value"):
            return tensor.unsqueeze(1)
        return tensor.unsqueeze(0) if role == "key_padding_mask" else tensor

    def _projections(self, operands):
        """q, k, v as (batch, heads, length, head_dim), projected as eager's _in_projection(_packed)."""
        query, key, value = operands["query"], operands["key"], operands["value"]
        embed_dim = query.shape[-1]
        bias = operands.get("in_proj_bias")
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        if "in_proj_weight" not in operands:
            weights = (operands["q_proj_weight"], operands["k_proj_weight"], operands["v_proj_weight"])
            projected = [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]
        elif query is key is value:
            packed = F.linear(query, operands["in_proj_weight"], bias).unflatten(-1, (3, embed_dim))
            projected = packed.unbind(-2)
        else:
            weights = operands["in_proj_weight"].chunk(3)
            projected = [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]
        heads = self.heads.num_heads
        return [x.reshape(x.shape[0], x.shape[1] * heads, -1).transpose(0, 1)
                .view(x.shape[1], heads, x.shape[0], -1) for x in projected]

    def _merged_mask(self, operands, batch: int, tgt_len: int, src_len: int) -> torch.Tensor:
        """key_padding_mask and attn_mask merged into one additive (batch, heads or 1, tgt_len, src_len)
        mask, bool masks as -inf where True, as F.multi_head_attention_forward does."""
        dtype = operands["query"].dtype
        merged = None
        attn_mask = operands.get("attn_mask")
        if attn_mask is not None:
            merged = _additive(attn_mask, dtype)
            merged = merged.view(batch, -1, tgt_len, src_len) if merged.dim() == 3 else merged
        padding = operands.get("key_padding_mask")
        if padding is not None:
            padding = _additive(padding, dtype).view(batch, 1, 1, src_len)
            merged = padding if merged is None else merged + padding
        return merged


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


@dataclass(frozen=True)
class EncoderLayout:
    """torch._transformer_encoder_layer_fwd's tensors as the graph passes them (`roles`) and its flags;
    mask_type 1 is a key padding mask (batch, src_len), 2 a merged (batch, heads, len, len) mask."""

    roles: tuple[str, ...]
    num_heads: int
    use_gelu: bool
    norm_first: bool
    eps: float
    mask_type: int | None


class EncoderLayerOp(MultiheadAttentionOp):
    """nn.TransformerEncoderLayer's inference fast path (torch._transformer_encoder_layer_fwd, batch
    first): the layer norms and the feed-forward block in PyTorch, the self-attention as
    MultiheadAttentionOp with the mask as the native op reads it."""

    def __init__(self, replaced, layer: EncoderLayout, head_dim: int, out_dtype: torch.dtype,
                 static_form: MaskForm | None, tensor_form: MaskForm | None, mode: str = "default"):
        mask_role = {1: ("key_padding_mask",), 2: ("attn_mask",)}.get(layer.mask_type, ())
        roles = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")
        super().__init__(replaced, MultiheadLayout(roles + mask_role, layer.num_heads, need_weights=False), head_dim,
                         out_dtype, static_form, tensor_form, mode=mode)
        self.layer = layer

    library_op = "transformer_encoder_layer"
    graph_output = staticmethod(library.visible_outputs)

    def output_like(self, *tensors):
        src = dict(zip(self.layer.roles, tensors))["src"]
        return torch.empty_like(src, memory_format=torch.contiguous_format)

    def forward(self, *tensors):
        operands = dict(zip(self.layer.roles, tensors))
        x = operands["src"]
        if self.layer.norm_first:
            x = x + self._self_attention(self._norm(x, operands, 1), operands)
            return x + self._feed_forward(self._norm(x, operands, 2), operands)
        x = self._norm(x + self._self_attention(x, operands), operands, 1)
        return self._norm(x + self._feed_forward(x, operands), operands, 2)

    def _self_attention(self, x, operands):
        x = x.transpose(0, 1)
        weights = [operands[role] for role in ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")]
        masks = [operands["mask"]] if "mask" in operands else []
        out = super().forward(x, x, x, *weights, *masks)
        return out.transpose(0, 1)

    def _norm(self, x, operands, index: int):
        return F.layer_norm(x, x.shape[-1:], operands[f"norm{index}_weight"], operands[f"norm{index}_bias"],
                            self.layer.eps)

    def _feed_forward(self, x, operands):
        hidden = F.linear(x, operands["linear1_weight"], operands["linear1_bias"])
        hidden = F.gelu(hidden) if self.layer.use_gelu else F.relu(hidden)
        return F.linear(hidden, operands["linear2_weight"], operands["linear2_bias"])

"""The attention pass recognises attention however it is spelled, and its kernel matches eager.

Every test asserts the pass fired (an attention op in the compiled graph) and that the
compiled output is within the tolerance rule of fp64 eager.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from tests.compiler.equivalence import assert_compiles_equivalent

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def qkv(batch, heads, q_len, kv_len, head_dim, kv_heads=None, value_dim=None, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, kv_len, value_dim or head_dim, generator=generator)
    return q.to(device), k.to(device), v.to(device)


class NaiveCausal(nn.Module):
    """nanoGPT: scale by mul, masked_fill with a tril (bottom-right aligned when q_len < kv_len)."""

    def forward(self, q, k, v):
        lq, lk = q.shape[-2], k.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
        return F.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class EinsumAdditive(nn.Module):
    """einsum spelling, divide by sqrt(d), additive -inf triu bias."""

    def forward(self, q, k, v):
        lq, lk = q.shape[-2], k.shape[-2]
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        bias = torch.full((lq, lk), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        probs = torch.softmax(scores + bias, dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", probs, v)


class EinsumSequenceFirst(nn.Module):
    """(batch, seq, heads, dim) layout contracted by einsum, as several codebases write it."""

    def forward(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        probs = scores.softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class Bmm3d(nn.Module):
    """(batch*heads, L, D) tensors with torch.bmm and no mask."""

    def forward(self, q, k, v):
        b, h, l, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, v))
        probs = torch.bmm(q3 * d ** -0.5, k3.transpose(1, 2)).softmax(-1)
        return torch.bmm(probs, v3).view(b, h, l, v.shape[-1])


class WhereTensorFill(nn.Module):
    """GPT-2/GPT-Neo: torch.where(causal, scores, torch.tensor(finfo.min)) and an in-place scale (Falcon)."""

    def forward(self, q, k, v):
        lq, lk = q.shape[-2], k.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores /= math.sqrt(q.shape[-1])
        causal = torch.ones(lk, lk, dtype=torch.bool, device=q.device).tril()[lk - lq:lk, :lk]
        fill = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        scores = torch.where(causal, scores, fill)
        return torch.matmul(nn.functional.softmax(scores, dim=-1), v)


class FairseqPaddingMask(nn.Module):
    """fairseq's MultiheadAttention: (b*h, L, d) bmm scores viewed (b, h, Lq, Lk) for a key padding
    mask, viewed back, softmax, bmm with v."""

    def forward(self, q, k, v, key_padding_mask):
        b, h, lq, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q * d ** -0.5, k, v))
        weights = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, lq, k.shape[2])
        weights = weights.masked_fill(key_padding_mask.unsqueeze(1).unsqueeze(2), float("-inf"))
        weights = F.softmax(weights.view(b * h, lq, k.shape[2]).float(), dim=-1).type_as(q3)
        return torch.bmm(weights, v3).view(b, h, lq, v.shape[-1])


class BaddbmmCausal(nn.Module):
    """GPT-NeoX's former _attn: baddbmm into zeros with alpha = 1/sqrt(d) over (b*h, L, d) tensors,
    the scores viewed (b, h, L, L), a causal where with a tensor fill, matmul with 4-d v."""

    def forward(self, q, k, v):
        b, h, lq, d = q.shape
        lk = k.shape[2]
        q3, k3 = q.reshape(b * h, lq, d), k.reshape(b * h, lk, d)
        scores = torch.zeros(b * h, lq, lk, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(scores, q3, k3.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(d)).view(b, h, lq, lk)
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
        return torch.matmul(F.softmax(scores, dim=-1), v)


class CausalThenPadding(nn.Module):
    """GPT-2's former _attn: a causal where with finfo.min, then the padding bias (0 / -inf) added."""

    def forward(self, q, k, v, padding_bias):
        lq, lk = q.shape[-2], k.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        causal = torch.ones(lk, lk, dtype=torch.bool, device=q.device).tril()[lk - lq:, :]
        scores = torch.where(causal, scores, torch.finfo(scores.dtype).min) + padding_bias
        return torch.matmul(F.softmax(scores, dim=-1), v)


class SubtractedMasks(nn.Module):
    """Masks subtracted from the scores (Funnel's and XLNet's spelling): a constant causal one with
    finfo.max, then (given `keep`) a padding one from the input with 1e4 (a bias, not a drop)."""

    def forward(self, q, k, v, keep=None):
        lq, lk = q.shape[-2], k.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        causal = torch.ones(lq, lk, dtype=q.dtype, device=q.device).tril()
        scores = scores - torch.finfo(scores.dtype).max * (1 - causal)
        if keep is not None:
            scores = scores - 1e4 * (1 - keep[:, None, None, :].to(q.dtype))
        return torch.matmul(F.softmax(scores, dim=-1), v)


class PaddingThenCausal(nn.Module):
    """A key padding mask filled with -inf, then a causal masked_fill: two bool masks."""

    def forward(self, q, k, v, padding):
        lq, lk = q.shape[-2], k.shape[-2]
        scores = (q @ k.transpose(-1, -2)).masked_fill(padding[:, None, None, :], float("-inf"))
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
        return scores.softmax(dim=-1) @ v


class TorchMultihead(nn.Module):
    """nn.MultiheadAttention as models call it: self- or cross-attention, masks, need_weights either way
    (the weights dropped), batch-first or not, separate key/value dims."""

    def __init__(self, embed_dim=96, heads=4, kdim=None, batch_first=True, need_weights=False, is_causal=False):
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dim, heads, kdim=kdim, vdim=kdim, batch_first=batch_first)
        self.need_weights, self.is_causal = need_weights, is_causal

    def forward(self, query, memory=None, key_padding_mask=None, attn_mask=None):
        memory = query if memory is None else memory
        out, _ = self.attention(query, memory, memory, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                need_weights=self.need_weights, is_causal=self.is_causal)
        return out


class TorchEncoder(nn.Module):
    """nn.TransformerEncoderLayer (batch first), or an nn.TransformerEncoder of several: in eval without
    gradients each layer runs PyTorch's fused fast path, one op per layer. (TransformerEncoder's own
    padding-mask checks are data-dependent, so masks go to a single layer.)"""

    def __init__(self, layers=1, **options):
        super().__init__()
        layer = nn.TransformerEncoderLayer(96, 4, 160, batch_first=True, **options)
        self.encoder = layer if layers == 1 else nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x, mask=None, padding=None):
        if isinstance(self.encoder, nn.TransformerEncoder):
            return self.encoder(x)
        return self.encoder(x, src_mask=mask, src_key_padding_mask=padding)


class StateScaled(nn.Module):
    """Scales held as module state: GPT-J's former tensor attribute sqrt(d) (divided by), a registered
    buffer (multiplied by), and old GPT-2's torch.full([], sqrt(d)) built in the graph."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.scale_attn = torch.sqrt(torch.tensor(float(head_dim)))
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale_attn.to(q.dtype)
        scores = scores / torch.full([], 2.0, dtype=q.dtype, device=q.device) * self.temperature.to(q.dtype)
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        return torch.matmul(scores.masked_fill(~causal, float("-inf")).softmax(dim=-1), v)


class WithMask(nn.Module):
    """A run-time mask: bool via masked_fill (fill where True) or additive."""

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
        return torch.matmul(nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


class RepeatKv(nn.Module):
    """GQA with repeat_interleave on the head dimension."""

    def forward(self, q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.mT / math.sqrt(q.shape[-1])
        return scores.softmax(dim=-1) @ v


class InPlaceStatements(nn.Module):
    """In-place calls written as statements on fresh scores, the scores read again after them:
    scores.div_(s); scores.masked_fill_(mask, -inf); softmax(scores)."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2)
        scores.div_(math.sqrt(q.shape[-1]))
        scores.masked_fill_(mask, float("-inf"))
        return scores.softmax(dim=-1) @ v


class ExpandedAsScores(nn.Module):
    """mask.expand_as(scores) reads the scores' shape only; type_as(scores) their dtype."""

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(mask.expand_as(scores), torch.finfo(scores.dtype).min)
        return torch.softmax(scores.float(), -1).type_as(scores) @ v


class WrittenOutSoftmax(nn.Module):
    """The softmax written out, with the row max subtracted (max(...).values) for stability."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        return (e / e.sum(dim=-1, keepdim=True)) @ v


class Gemma2SoftCap(nn.Module):
    """Gemma 2's eager attention: scale, logit soft-capping (divide, tanh, multiply), then an
    additive mask, fp32 softmax."""

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        scores = torch.tanh(scores / 50.0) * 50.0
        return torch.matmul(F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype), v)


class GrokSoftCap(nn.Module):
    """Grok-1's spelling: cap * tanh(s * (1 / cap)) through nn.Tanh, a causal masked_fill after it."""

    def __init__(self):
        super().__init__()
        self.tanh = nn.Tanh()

    def forward(self, q, k, v):
        scores = 30.0 * self.tanh(torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.08 * (1 / 30.0))
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


class Sdpa(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v, *mask):
        return F.scaled_dot_product_attention(q, k, v, *mask, **self.options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,q_len,kv_len,head_dim", [
    (1, 2, 1, 1, 64),
    (2, 2, 113, 113, 59),
    (1, 2, 203, 203, 96),
    (1, 1, 1023, 1024, 128),
    (1, 2, 37, 111, 111),
])
def test_naive_causal(dtype, batch, heads, q_len, kv_len, head_dim):
    assert_compiles_equivalent(NaiveCausal(), qkv(batch, heads, q_len, kv_len, head_dim), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,head_dim", [(113, 64), (203, 80)])
def test_einsum_additive_causal(dtype, q_len, head_dim):
    assert_compiles_equivalent(EinsumAdditive(), qkv(1, 3, q_len, q_len, head_dim), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_einsum_sequence_first_layout(dtype):
    assert_compiles_equivalent(EinsumSequenceFirst(), qkv(2, 3, 57, 80, 48), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,kv_len", [(113, 113), (37, 203)])
def test_where_with_a_constant_tensor_fill(dtype, q_len, kv_len):
    assert_compiles_equivalent(WhereTensorFill(), qkv(2, 2, q_len, kv_len, 64), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_regrouped_around_a_padding_mask(dtype):
    q, k, v = qkv(2, 3, 37, 113, 64, value_dim=48)
    padding = torch.zeros(2, 113, dtype=torch.bool)
    padding[1, 90:] = True
    assert_compiles_equivalent(FairseqPaddingMask(), (q, k, v, padding), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_baddbmm_scores_regrouped_before_a_causal_mask(dtype):
    compiled = assert_compiles_equivalent(BaddbmmCausal(), qkv(2, 2, 113, 113, 64), dtype, "attention")
    assert "causal (top_left)" in compiled.report()


def padding_masks(batch: int, kv_len: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool padding, additive padding bias (batch, 1, 1, kv_len)): the last row padded 5 keys on `side`."""
    padding = torch.zeros(batch, kv_len, dtype=torch.bool)
    padding[-1, :5] = side == "left"
    padding[-1, -5:] = side == "right"
    return padding, torch.zeros(batch, 1, 1, kv_len).masked_fill(padding[:, None, None, :], float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_mask_then_padding_bias(dtype, side):
    q, k, v = qkv(2, 2, 37, 37, 64)
    compiled = assert_compiles_equivalent(CausalThenPadding(), (q, k, v, padding_masks(2, 37, side)[1]), dtype,
                                          "attention")
    assert "bool then additive masks as one bias" in compiled.report()
    # Left padding leaves the padded queries no visible key: those calls run eager's math, exactly.
    assert ("keeps no clearly visible key" in compiled.report()) == (side == "left")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_masks_subtracted_from_the_scores(dtype, padded):
    q, k, v = qkv(2, 2, 29, 29, 32)
    keep = (~padding_masks(2, 29, "right")[0]).float()
    compiled = assert_compiles_equivalent(SubtractedMasks(), (q, k, v, keep) if padded else (q, k, v), dtype,
                                          "attention")
    assert ("additive then additive masks" if padded else "causal (top_left)") in compiled.report()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_then_causal_masks(dtype):
    q, k, v = qkv(2, 2, 29, 41, 48)
    assert_compiles_equivalent(PaddingThenCausal(), (q, k, v, padding_masks(2, 41, "right")[0]), dtype, "attention")


def multihead_case(name: str):
    """(module, inputs) of one nn.MultiheadAttention use."""
    generator = torch.Generator().manual_seed(len(name))
    x = torch.randn(2, 37, 96, generator=generator)
    padding = padding_masks(2, 37, "right")[0]
    causal = nn.Transformer.generate_square_subsequent_mask(37)
    if name == "self":
        return TorchMultihead(), (x,)
    if name == "weights_dropped_padding_causal":
        return TorchMultihead(need_weights=True), (x, None, padding, causal < 0)
    if name == "is_causal":
        return TorchMultihead(is_causal=True), (x, None, None, causal)
    if name == "cross_kdim_sequence_first":
        memory = torch.randn(113, 2, 40, generator=generator)
        return TorchMultihead(kdim=40, batch_first=False), (x.transpose(0, 1), memory, padding_masks(2, 113, "left")[0])
    if name == "unbatched_bool_attn_mask":
        return TorchMultihead(heads=3), (x[0], None, None, causal)
    raise ValueError(name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["self", "weights_dropped_padding_causal", "is_causal", "cross_kdim_sequence_first",
                                  "unbatched_bool_attn_mask"])
def test_torch_multihead_attention(dtype, name):
    module, args = multihead_case(name)
    compiled = assert_compiles_equivalent(module, args, dtype, "attention")
    assert "nn.MultiheadAttention" in compiled.report()
    assert ("causal (top_left)" in compiled.report()) == (name == "is_causal")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options, masks", [
    ({"layers": 2}, ""),
    ({"activation": "gelu", "norm_first": True}, "padding"),
    ({}, "causal+padding"),
], ids=["two_layers", "gelu_norm_first_padding", "causal_padding"])
def test_torch_transformer_encoder_fast_path(dtype, options, masks):
    x = torch.randn(2, 37, 96, generator=torch.Generator().manual_seed(3))
    causal = nn.Transformer.generate_square_subsequent_mask(37) < 0 if "causal" in masks else None
    padding = padding_masks(2, 37, "right")[0] if "padding" in masks else None
    compiled = assert_compiles_equivalent(TorchEncoder(**options), (x, causal, padding), dtype, "attention",
                                          count=options.get("layers", 1))
    assert "nn.TransformerEncoderLayer fast path" in compiled.report()


def test_fully_masked_rows_stay_nan_as_in_the_native_encoder_layer():
    layer = TorchEncoder().eval()
    padding = torch.zeros(2, 37, dtype=torch.bool)
    padding[1] = True
    x = torch.randn(2, 37, 96)
    compiled = compiler.compile(layer, strict=True)
    with torch.no_grad():
        ours, eager = compiled(x, None, padding), layer(x, None, padding)
    assert "attention" in compiled.patterns
    torch.testing.assert_close(ours, eager, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_written_out_softmax(dtype):
    assert_compiles_equivalent(WrittenOutSoftmax(), qkv(2, 3, 57, 80, 48), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_expanded_as_the_scores(dtype):
    q, k, v = qkv(2, 3, 57, 57, 32)
    mask = torch.rand(2, 1, 1, 57, generator=torch.Generator().manual_seed(2)) < 0.3
    assert_compiles_equivalent(ExpandedAsScores(), (q, k, v, mask), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_statements_on_fresh_scores(dtype):
    q, k, v = qkv(2, 3, 57, 80, 48)
    mask = torch.rand(2, 1, 57, 80, generator=torch.Generator().manual_seed(1)) < 0.3
    assert_compiles_equivalent(InPlaceStatements(), (q, k, v, mask), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,kv_len,head_dim", [(1, 300, 64), (113, 113, 59), (37, 203, 128)])
def test_logit_softcap_then_mask(dtype, q_len, kv_len, head_dim):
    q, k, v = qkv(2, 4, q_len, kv_len, head_dim, kv_heads=2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    q = q * 8  # scores well past the cap: tanh saturates
    mask = torch.zeros(2, 1, q_len, kv_len)
    mask[1, ..., :5] = torch.finfo(torch.float32).min  # left padding
    compiled = assert_compiles_equivalent(Gemma2SoftCap(), (q, k, v, mask), dtype, "attention")
    assert "scores soft-capped: 50 * tanh" in compiled.report()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logit_softcap_with_module_tanh_and_causal_fill(dtype):
    compiled = assert_compiles_equivalent(GrokSoftCap(), qkv(1, 2, 77, 77, 32), dtype, "attention")
    assert "causal (top_left)" in compiled.report() and "soft-capped: 30 * tanh" in compiled.report()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scales_from_module_state(dtype):
    compiled = assert_compiles_equivalent(StateScaled(64), qkv(2, 2, 37, 37, 64), dtype, "attention")
    assert "re-read when they change" in compiled.report()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bmm_without_mask(dtype):
    assert_compiles_equivalent(Bmm3d(), qkv(2, 3, 113, 203, 64, value_dim=96), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", ["full", "key_padding", "square"])
def test_runtime_masks(dtype, mask_kind, mask_shape):
    q, k, v = qkv(2, 2, 113, 113, 64)
    shape = {"full": (2, 2, 113, 113), "key_padding": (2, 1, 1, 113), "square": (113, 113)}[mask_shape]
    generator = torch.Generator().manual_seed(1)
    dropped = torch.rand(shape, generator=generator) < 0.3
    mask = dropped if mask_kind == "bool" else torch.randn(shape, generator=generator).masked_fill(dropped, -1e9)
    assert_compiles_equivalent(WithMask(), (q, k, v, mask), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_gqa_repeat_interleave(dtype, heads, kv_heads):
    assert_compiles_equivalent(RepeatKv(), qkv(1, heads, 113, 113, 64, kv_heads=kv_heads), dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options,shape", [
    ({"is_causal": True}, (2, 2, 203, 203, 64)),
    ({"is_causal": True}, (1, 2, 113, 203, 111)),
    ({"scale": 0.3}, (1, 2, 1, 1024, 128)),
    ({"is_causal": True, "enable_gqa": True}, (1, 4, 113, 113, 96)),
])
def test_sdpa(dtype, options, shape):
    batch, heads, q_len, kv_len, head_dim = shape
    kv_heads = 2 if options.get("enable_gqa") else heads
    args = qkv(batch, heads, q_len, kv_len, head_dim, kv_heads=kv_heads)
    assert_compiles_equivalent(Sdpa(**options), args, dtype, "attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_sdpa_masks(dtype, mask_kind):
    q, k, v = qkv(2, 2, 113, 160, 64)
    generator = torch.Generator().manual_seed(2)
    keep = torch.rand(2, 1, 113, 160, generator=generator) > 0.3
    keep[0, 0, 5] = False
    mask = keep if mask_kind == "bool" else torch.randn(2, 1, 113, 160, generator=generator)
    assert_compiles_equivalent(Sdpa(), (q, k, v, mask), dtype, "attention")


def test_constant_causal_mask_becomes_block_skipping():
    compiled = assert_compiles_equivalent(NaiveCausal(), qkv(1, 2, 64, 64, 64), torch.float32, "attention")
    assert "causal (top_left)" in compiled.report()
    compiled = assert_compiles_equivalent(NaiveCausal(), qkv(1, 2, 16, 64, 64), torch.float32, "attention")
    assert "causal (bottom_right)" in compiled.report()


class BufferBias(nn.Module):
    """The scores plus a registered (L, L) causal bias buffer, read as is."""

    def __init__(self, length: int):
        super().__init__()
        self.register_buffer("bias", torch.full((length, length), float("-inf")).triu(1))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125 + self.bias, dim=-1) @ v


def change_scales(module: StateScaled) -> None:
    module.temperature.fill_(3.0)
    module.scale_attn.mul_(0.5)


@pytest.mark.parametrize("module, folded, change", [
    (StateScaled(64), "re-read when they change", change_scales),
    (BufferBias(29), "causal (top_left) while buffers", lambda module: module.bias.zero_()),
], ids=["scales", "mask"])
def test_module_state_changed_in_place_is_followed(module, folded, change):
    """Scales and masks folded in from module state at compile time follow in-place changes to it."""
    module = module.eval()
    compiled = compiler.compile(module, strict=True)
    q, k, v = qkv(1, 2, 29, 29, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
        assert folded in compiled.report()
        change(module)
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
    assert compiled.patterns == ["attention"]


class SlicedCausalBuffer(nn.Module):
    """GPT-2's spelling: a (1, 1, n, n) bool causal buffer sliced to the length, filled with -inf where false."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("bias", torch.ones(size, size, dtype=torch.bool).tril().view(1, 1, size, size))

    def forward(self, q, k, v):
        length = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) * 0.125
        scores = scores.masked_fill(~self.bias[:, :, :length, :length], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("length", [64, 29], ids=["rows of whole words", "rows of odd bytes"])
def test_folded_buffer_written_through_data_between_replays_is_seen(length):
    """The fast path's compare of a folded mask (as int64 words where the slice's layout allows it)
    sees one byte written behind the version counter, after the path was planned, bound and replayed."""
    module = SlicedCausalBuffer(96).eval()
    compiled = compiler.compile(module, strict=True)
    q, k, v = qkv(1, 2, length, length, 64)
    with torch.no_grad():
        for _ in range(3):  # plan, bind, replay
            torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
        assert "causal (top_left) while buffers" in compiled.report()
        module.bias.data[0, 0, length - 1, 0] = False  # the last query no longer sees the first key
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
        module.bias.data[0, 0, length - 1, 0] = True
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
    assert compiled.patterns == ["attention"]


def test_kernel_sources_are_listed_and_cached():
    compiled = assert_compiles_equivalent(NaiveCausal(), qkv(1, 1, 16, 16, 32), torch.float32, "attention")
    (kernel,) = compiled.kernels
    assert kernel.pattern == "attention"
    assert "@triton.jit" in kernel.source
    with open(kernel.path) as handle:
        assert handle.read() == kernel.source


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("module,shape,kv_heads", [
    (NaiveCausal(), (2, 16, 2048, 2048, 64), None),
    (NaiveCausal(), (1, 8, 1023, 4096, 128), None),
    (EinsumAdditive(), (1, 8, 8192, 8192, 128), None),
    (Sdpa(is_causal=True), (4, 32, 1024, 1024, 64), None),
    (Sdpa(is_causal=True, enable_gqa=True), (2, 32, 4096, 4096, 128), 8),
    (RepeatKv(), (2, 32, 2048, 2048, 96), 4),
    (Bmm3d(), (2, 16, 203, 4096, 111), None),
], ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else None)
def test_cuda_real_sizes(dtype, module, shape, kv_heads):
    batch, heads, q_len, kv_len, head_dim = shape
    args = qkv(batch, heads, q_len, kv_len, head_dim, kv_heads=kv_heads, device="cuda")
    assert_compiles_equivalent(module, args, dtype, "attention")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_regrouped_scores_two_masks_and_torch_modules(dtype):
    q, k, v = qkv(2, 8, 1024, 1024, 64, device="cuda")
    padding, padding_bias = (mask.cuda() for mask in padding_masks(2, 1024, "right"))
    assert_compiles_equivalent(FairseqPaddingMask(), (q, k, v, padding), dtype, "attention")
    assert_compiles_equivalent(CausalThenPadding(), (q, k, v, padding_bias), dtype, "attention")
    x = torch.randn(2, 1024, 512, device="cuda")
    assert_compiles_equivalent(TorchMultihead(512, 8).cuda(), (x, None, padding), dtype, "attention")
    assert_compiles_equivalent(TorchEncoder(layers=2).cuda(), (x[..., :96],), dtype, "attention", count=2)

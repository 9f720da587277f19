"""Attention and sparse MLPs as other people write them: each module fuses and matches eager.

Each case is a small module written in the style of a real code base (timm, x-transformers and
lucidrains' PaLM, Meta's Llama, Hugging Face's BERT, DistilBERT, T5, CLIP, Whisper, BLOOM, GPT-NeoX
and its SDPA path, nanoGPT, Swin, diffusers, DeBERTa; DejaVu / PowerInfer / ReLU-fied Llama / CATS /
ProSparse MLPs), at awkward sizes.
The test compiles it, asserts that the family fused once and its kernel ran (no run-time fallback),
and holds the output to the tolerance rule against fp64 eager on the input it was compiled for and on
a fresh one. The forms left to PyTorch (flex_attention, a Dynamo graph break under the softmax) must
run exactly as eager and be named in report().
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

import compiler
from tests.compiler.equivalence import cast_inputs
from tests.compiler.test_robustness_families import assert_kernel_ran
from tests.numerics import assert_close_by_rule

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
BATCH, LENGTH, WIDTH, HEADS = 2, 13, 40, 4  # head dim 10
FFN, ACTIVE = 101, 23

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning",
    "ignore:overflow encountered:RuntimeWarning",  # the interpreter's numpy scaling finfo.min masks, as eager's does
    "ignore:flex_attention called without torch.compile:UserWarning",  # the eager reference run
)


# -- attention -------------------------------------------------------------------------------------
class TimmAttention(nn.Module):
    """timm's vision_transformer.Attention: one qkv linear, reshape/permute/unbind, fused_attn or not."""

    def __init__(self, fused_attn: bool, qk_norm: bool = False, dim: int = WIDTH, num_heads: int = HEADS):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale, self.fused_attn = self.head_dim ** -0.5, fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.1), nn.Linear(dim, dim), nn.Dropout(0.1)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class XTransformersAttention(nn.Module):
    """x-transformers: einops heads, einsum scores, masked_fill(~mask, -finfo.max), causal triu(j - i + 1)."""

    def __init__(self, causal: bool, stable: bool = False, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.scale, self.causal, self.stable = heads, (dim // heads) ** -0.5, causal, stable
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        q, k, v = (rearrange(t, 'b n (h d) -> b h n d', h=self.heads) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        dots = torch.einsum('b h i d, b h j d -> b h i j', q, k) * self.scale
        max_neg_value = -torch.finfo(dots.dtype).max
        if mask is not None:
            dots = dots.masked_fill(~rearrange(mask, 'b j -> b 1 1 j'), max_neg_value)
        if self.causal:
            i, j = dots.shape[-2:]
            dots = dots.masked_fill(torch.ones((i, j), dtype=torch.bool, device=x.device).triu(j - i + 1), max_neg_value)
        if self.stable:
            dots = dots - dots.amax(dim=-1, keepdim=True).detach()
        attn = dots.softmax(dim=-1)
        out = torch.einsum('b h i j, b h j d -> b h i d', attn, v)
        return self.to_out(rearrange(out, 'b h n d -> b n (h d)'))


class GroupedEinopsAttention(nn.Module):
    """lucidrains' grouped-query attention: einops repeat of k and v, causal mask by triu on ones."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, q, k, v):
        k, v = (repeat(t, 'b h n d -> b (h g) n d', g=self.groups) for t in (k, v))
        sim = torch.einsum('b h i d, b h j d -> b h i j', q, k) * q.shape[-1] ** -0.5
        i, j = sim.shape[-2:]
        sim = sim.masked_fill(torch.ones((i, j), device=q.device, dtype=torch.bool).triu(j - i + 1),
                              -torch.finfo(sim.dtype).max)
        return torch.einsum('b h i j, b h j d -> b h i d', sim.softmax(dim=-1), v)


class PaLMMultiQuery(nn.Module):
    """lucidrains' PaLM: one shared key/value head, einsum('b h i d, b j d -> b h i j')."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * (dim // heads), bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        n = x.shape[1]
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads) * self.scale
        k, v = self.to_kv(x).chunk(2, dim=-1)
        sim = torch.einsum("b h i d, b j d -> b h i j", q, k)
        sim = sim.masked_fill(torch.ones((n, n), device=x.device, dtype=torch.bool).triu(1), -torch.finfo(sim.dtype).max)
        out = torch.einsum("b h i j, b j d -> b h i d", sim.softmax(dim=-1), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BloomAttention(nn.Module):
    """BLOOM: alibi.baddbmm(q, k, beta, alpha=inv_norm_factor), causal masked_fill, fp32 softmax cast back."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.query_key_value, self.dense = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, alibi):
        b, n, _ = x.shape
        fused = self.query_key_value(x).view(b, n, self.heads, 3, self.head_dim)
        q, k, v = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
        q = q.transpose(1, 2).reshape(b * self.heads, n, self.head_dim)
        k = k.permute(0, 2, 3, 1).reshape(b * self.heads, self.head_dim, n)
        v = v.transpose(1, 2).reshape(b * self.heads, n, self.head_dim)
        scores = alibi.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=self.inv_norm_factor).view(b, self.heads, n, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)[None, None]
        weights = torch.masked_fill(scores, causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(x.dtype).view(b * self.heads, n, n)
        context = torch.bmm(probs, v).view(b, self.heads, n, self.head_dim).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.dense(context)


class NeoXAttention(nn.Module):
    """GPT-NeoX's former _attn: baddbmm into zeros with alpha = torch.tensor(1.0) / norm_factor (a float, or
    a buffer: then TorchDynamo breaks the graph at the baddbmm), where(causal, scores, finfo.min), then the
    extended padding mask."""

    def __init__(self, norm_factor: str, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        if norm_factor == "buffer":
            self.register_buffer("norm_factor", torch.sqrt(torch.tensor(self.head_dim, dtype=torch.float32)),
                                 persistent=False)
        else:
            self.norm_factor = math.sqrt(self.head_dim)
        self.query_key_value, self.dense = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, self.heads, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv[..., :self.head_dim], qkv[..., self.head_dim:2 * self.head_dim], qkv[..., 2 * self.head_dim:]
        causal_mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device)).view(1, 1, n, n)
        q, k = q.reshape(b * self.heads, n, self.head_dim), k.reshape(b * self.heads, n, self.head_dim)
        scores = torch.zeros(b * self.heads, n, n, dtype=q.dtype, device=k.device)
        alpha = torch.tensor(1.0, dtype=torch.float32, device=x.device) / self.norm_factor
        scores = torch.baddbmm(scores, q, k.transpose(1, 2), beta=1.0, alpha=alpha).view(b, self.heads, n, n)
        mask_value = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype).to(scores.device)
        scores = torch.where(causal_mask, scores, mask_value) + attention_mask
        weights = F.softmax(scores, dim=-1).to(v.dtype)
        return self.dense(torch.matmul(weights, v).permute(0, 2, 1, 3).contiguous().view(b, n, -1))


def extended_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Hugging Face's get_extended_attention_mask: (1 - mask) * finfo.min, as (b, 1, 1, L)."""
    return (1.0 - keep[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class BertSelfAttention(nn.Module):
    """Hugging Face's BERT: transpose_for_scores, / sqrt(d), + extended mask, dropout(softmax)."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.dropout = nn.Dropout(0.1)

    def transpose_for_scores(self, x):
        return x.view(x.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, x, keep):
        q, k, v = (self.transpose_for_scores(proj(x)) for proj in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + extended_mask(keep, x.dtype)
        context = torch.matmul(self.dropout(nn.functional.softmax(scores, dim=-1)), v).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.heads * self.head_dim,))


class DistilBertAttention(nn.Module):
    """DistilBERT: q / sqrt(d), (mask == 0).view(...).expand_as(scores), masked_fill(tensor(finfo.min))."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(dim, dim) for _ in range(4))
        self.dropout = nn.Dropout(0.1)

    def forward(self, query, mask):
        bs, _, _ = query.size()
        head_dim = self.dim // self.heads

        def shape(x):
            return x.view(bs, -1, self.heads, head_dim).transpose(1, 2)

        q, k, v = shape(self.q_lin(query)), shape(self.k_lin(query)), shape(self.v_lin(query))
        scores = torch.matmul(q / math.sqrt(head_dim), k.transpose(2, 3))
        mask = (mask == 0).view(bs, 1, 1, query.size(1)).expand_as(scores)
        scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
        context = torch.matmul(self.dropout(nn.functional.softmax(scores, dim=-1)), v)
        return self.out_lin(context.transpose(1, 2).contiguous().view(bs, -1, self.dim))


class T5Attention(nn.Module):
    """T5: no scaling; bucketed relative position bias from an nn.Embedding plus the extended mask,
    added in place (scores += position_bias); softmax(scores.float()).type_as(scores)."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS, buckets: int = 8):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.relative_attention_bias = nn.Embedding(buckets, heads)

    def forward(self, x, keep):
        b, n, _ = x.shape

        def shape(t):
            return t.view(b, -1, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = shape(self.q(x)), shape(self.k(x)), shape(self.v(x))
        scores = torch.matmul(q, k.transpose(3, 2))
        relative = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        position_bias = self.relative_attention_bias(relative.clamp(-4, 3) + 4).permute([2, 0, 1]).unsqueeze(0)
        scores += position_bias + extended_mask(keep, x.dtype)
        weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o(torch.matmul(weights, v).transpose(1, 2).contiguous().view(b, -1, self.heads * self.head_dim))


class ClipAttention(nn.Module):
    """CLIP: q scaled at projection, 3-d bmm over b * h, the causal and padding masks each added through a
    view to (b, h, L, L) and back."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def _shape(self, t, n, b):
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, x, attention_mask):
        b, n, e = x.size()
        causal = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype).triu_(1)[None, None].expand(b, 1, n, n)
        proj_shape = (b * self.heads, -1, self.head_dim)
        q = self._shape(self.q_proj(x) * self.scale, n, b).view(*proj_shape)
        k = self._shape(self.k_proj(x), -1, b).view(*proj_shape)
        v = self._shape(self.v_proj(x), -1, b).view(*proj_shape)
        weights = torch.bmm(q, k.transpose(1, 2))
        weights = (weights.view(b, self.heads, n, n) + causal).view(b * self.heads, n, n)
        weights = (weights.view(b, self.heads, n, n) + attention_mask).view(b * self.heads, n, n)
        weights = nn.functional.softmax(weights, dim=-1)
        out = torch.bmm(weights, v).view(b, self.heads, n, self.head_dim).transpose(1, 2).reshape(b, n, e)
        return self.out_proj(out)


class WhisperCrossAttention(nn.Module):
    """Whisper/BART: q_proj(x) * scaling before the heads split, k_proj without bias, a longer memory."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.k_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, memory):
        b, n, _ = x.shape
        q = (self.q_proj(x) * self.scaling).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(memory).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        weights = nn.functional.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)
        return self.out_proj(torch.matmul(weights, v).transpose(1, 2).reshape(b, n, -1))


class MetaLlamaAttention(nn.Module):
    """Meta's llama/model.py: repeat_kv on (b, s, h, d) before the transpose, / sqrt(d) + the mask made
    by hstack([zeros(L, start_pos), triu(full(-inf), 1)]), softmax(scores.float()).type_as(xq)."""

    def __init__(self, dim: int = WIDTH, n_heads: int = HEADS, n_kv_heads: int = 2):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.n_rep = n_heads // n_kv_heads
        self.wq, self.wo = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.wk, self.wv = (nn.Linear(dim, n_kv_heads * self.head_dim, bias=False) for _ in range(2))

    @staticmethod
    def repeat_kv(x, n_rep):
        bs, slen, n_kv_heads, head_dim = x.shape
        return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep,
                                                                                          head_dim)

    def forward(self, x, start_pos: int = 0):
        bsz, seqlen, _ = x.shape
        mask = torch.triu(torch.full((seqlen, seqlen), float("-inf"), device=x.device), diagonal=1)
        mask = torch.hstack([torch.zeros((seqlen, start_pos), device=x.device), mask]).type_as(x)
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        keys = self.repeat_kv(self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), self.n_rep)
        values = self.repeat_kv(self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), self.n_rep)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        return self.wo(torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class HFSdpaAttention(nn.Module):
    """Hugging Face's SDPA path: GQA by repeat_kv (expand + reshape) or enable_gqa;
    is_causal, or a 4-d additive mask (causal triu of finfo.min plus the extended padding mask)."""

    def __init__(self, gqa: str, masked: bool = False, dim: int = WIDTH, heads: int = HEADS, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.gqa, self.masked = heads, kv_heads, dim // heads, gqa, masked
        self.q_proj, self.o_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(dim, kv_heads * self.head_dim, bias=False) for _ in range(2))

    def forward(self, x, keep=None):
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, -1, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        rep, options = self.heads // self.kv_heads, {}
        if self.gqa == "expand":
            k, v = (t[:, :, None].expand(b, self.kv_heads, rep, n, self.head_dim).reshape(b, self.heads, n, self.head_dim)
                    for t in (k, v))
        else:
            options["enable_gqa"] = True
        if self.masked:
            causal = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
            options["attn_mask"] = causal[None, None] + extended_mask(keep, x.dtype)
        else:
            options["is_causal"] = True
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, **options)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class NanoGPTAttention(nn.Module):
    """nanoGPT's slow path: c_attn.split, masked_fill(self.bias[:, :, :T, :T] == 0, -inf) from a tril buffer."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS, block_size: int = 16):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head, self.n_embd = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, dim
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(self.n_embd, 2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf')), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class SwinWindowAttention(nn.Module):
    """Swin: a relative position bias gathered from a table by a buffer, the shifted-window mask added
    through view(B_ // nW, nW, nH, N, N), nn.Softmax."""

    def __init__(self, dim: int = WIDTH, window: tuple = (3, 3), heads: int = HEADS):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads))
        coords = torch.flatten(torch.stack(torch.meshgrid([torch.arange(window[0]), torch.arange(window[1])],
                                                          indexing="ij")), 1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        relative[:, :, 0] += window[0] - 1
        relative[:, :, 1] += window[1] - 1
        relative[:, :, 0] *= 2 * window[1] - 1
        self.register_buffer("relative_position_index", relative.sum(-1))
        self.qkv, self.proj, self.softmax = nn.Linear(dim, dim * 3), nn.Linear(dim, dim), nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        return self.proj((self.softmax(attn) @ v).transpose(1, 2).reshape(B_, N, C))


class UpcastAttention(nn.Module):
    """Attention computed in fp32: q.float() @ k.float().T / sqrt(d), softmax, .type_as(v)."""

    def forward(self, q, k, v):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return scores.softmax(-1).type_as(v) @ v


class BroadcastMultiQuery(nn.Module):
    """Falcon-style multi-query: k, v of one head (b, 1, L, d) broadcast by the matmul."""

    def forward(self, q, k, v):
        return F.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1) @ v



class DiffusersAttention(nn.Module):
    """diffusers' Attention.get_attention_scores: head_to_batch_dim, baddbmm into torch.empty with beta=0 and
    alpha=scale, q and k upcast to fp32 (upcast_attention), probabilities cast back, bmm."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def head_to_batch_dim(self, t):
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3).reshape(b * self.heads, n, d // self.heads)

    def batch_to_head_dim(self, t):
        bh, n, d = t.shape
        return t.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3).reshape(bh // self.heads, n, d * self.heads)

    def forward(self, x):
        q, k, v = (self.head_to_batch_dim(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        dtype = q.dtype
        q, k = q.float(), k.float()
        baddbmm_input = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(baddbmm_input, q, k.transpose(-1, -2), beta=0, alpha=self.scale)
        del baddbmm_input
        return self.to_out(self.batch_to_head_dim(torch.bmm(scores.softmax(dim=-1).to(dtype), v)))


class HFEagerAttention(nn.Module):
    """Hugging Face's eager_attention_forward: a 4-d float mask sliced to the key length, F.dropout."""

    def forward(self, q, k, v, attention_mask):
        weights = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5)
        weights = weights + attention_mask[:, :, :, : k.shape[-2]]
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = nn.functional.dropout(weights, p=0.1, training=self.training)
        return torch.matmul(weights, v).transpose(1, 2).contiguous()


class CachedDecodeStep(nn.Module):
    """A decode step: one query token, keys and values torch.cat to a cache along the sequence."""

    def forward(self, q, k, v, past_k, past_v):
        k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), -1), v)


class SlidingWindowAttention(nn.Module):
    """Mistral-style sliding window: tril(ones) & ~tril(ones, -window), where(keep, s, finfo.min)."""

    def forward(self, q, k, v, window: int = 4):
        ones = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        keep = torch.tril(ones) & ~torch.tril(ones, diagonal=-window)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.where(keep, scores, torch.finfo(scores.dtype).min).softmax(-1) @ v


class DocumentedSdpaReference(nn.Module):
    """The reference implementation in PyTorch's scaled_dot_product_attention docs, causal, dropout_p = 0."""

    def forward(self, q, k, v):
        L, S = q.size(-2), k.size(-2)
        attn_bias = torch.zeros(L, S, dtype=q.dtype, device=q.device)
        temp_mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
        attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
        attn_weight = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.size(-1)))
        attn_weight += attn_bias
        attn_weight = torch.dropout(torch.softmax(attn_weight, dim=-1), 0.0, train=True)
        return attn_weight @ v


class RotaryAttention(nn.Module):
    """Rotary embeddings (rotate_half by torch.cat) on q and k, then a causal masked_fill(-inf)."""

    def forward(self, q, k, v):
        n, d = q.shape[-2], q.shape[-1]
        freqs = torch.outer(torch.arange(n).float(), 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

        def rotate_half(x):
            return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        return torch.matmul(scores.softmax(-1), v)


class ScaleAfterPaddingMask(nn.Module):
    """(q k^T + (1 - keep) * -1e9) / sqrt(d): the scale applied after the additive mask."""

    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-1, -2) + (1.0 - keep[:, None, None, :]) * -1e9) / math.sqrt(q.shape[-1])
        return scores.softmax(-1) @ v


class TransposedValueEinsum(nn.Module):
    """v stored (b, h, d, L): einsum('bhij,bhdj->bhid')."""

    def forward(self, q, k, v):
        scores = torch.einsum('bhid,bhjd->bhij', q, k) * 0.3
        return torch.einsum('bhij,bhdj->bhid', scores.softmax(-1), v.transpose(-1, -2).contiguous())


class TiledKeyValueHeads(nn.Module):
    """k.repeat(1, n, 1, 1): query head i reads key head i % kv_heads (a tiling, not repeat_kv's i // n)."""

    def forward(self, q, k, v):
        k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
        return F.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v



class XSoftmaxAttention(nn.Module):
    """DeBERTa's XSoftmax: softmax(s.masked_fill(rmask, finfo.min)).masked_fill(rmask, 0): a sequence
    with no key kept gives zeros. `zero_by` another mask than the one applied (here the causal one after a
    padding mask) is left to PyTorch."""

    def __init__(self, zero_by: str = "same"):
        super().__init__()
        self.zero_by = zero_by

    def forward(self, q, k, v, keep):
        rmask = ~(keep[:, None, None, :].bool())
        scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(rmask, torch.finfo(q.dtype).min)
        if self.zero_by != "same":
            rmask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
        return torch.softmax(scores, -1).masked_fill(rmask, 0) @ v


class DeepSeekAttention(nn.Module):
    """DeepSeek-V3's MLA attention, attn_impl "absorb": scores summed from two einsums (the no-position and
    rotary parts) against a cache shared by the heads, `scores += mask.unsqueeze(1)`, fp32 softmax; or
    "naive": scores in a (b, s, h, t) layout (einsum 'bshd,bthd->bsht'), left to PyTorch."""

    def __init__(self, absorb: bool):
        super().__init__()
        self.absorb = absorb

    def forward(self, q, k, v, mask, pe_cache=None):
        if self.absorb:  # q: q_nope, k: q_pe, v: the kv cache
            scores = torch.einsum("bshc,btc->bsht", q, v) + torch.einsum("bshr,btr->bsht", k, pe_cache)
        else:
            scores = torch.einsum("bshd,bthd->bsht", q, k)
        scores = scores * 0.2
        scores += mask.unsqueeze(1)
        scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(q)
        return torch.einsum("bsht,btc->bshc", scores, v) if self.absorb else torch.einsum("bsht,bthd->bshd", scores, v)


class LearnedTemperature(nn.Module):
    """scores / self.temperature, an nn.Parameter (trained: q is scaled by it, not the kernel)."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(0.7))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) / self.temperature).softmax(-1) @ v


class CosineAttention(nn.Module):
    """Swin v2: normalize(q) @ normalize(k)^T times a learned per-head logit scale (h, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((HEADS, 1, 1))))

    def forward(self, q, k, v):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return (attn * torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()).softmax(-1) @ v


class FlexCausal(nn.Module):
    """torch.nn.attention.flex_attention with a causal score_mod."""

    def forward(self, q, k, v):
        from torch.nn.attention.flex_attention import flex_attention

        def causal(score, b, h, q_idx, kv_idx):
            return torch.where(q_idx >= kv_idx, score, -float("inf"))

        return flex_attention(q, k, v, score_mod=causal)


# -- sparse MLPs ------------------------------------------------------------------------------------
class TopkIndexSelectMLP(nn.Module):
    """DejaVu-like: a low-rank predictor's top-k over the batch, torch.index_select of fc1's rows and fc2's columns."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN, k: int = ACTIVE):
        super().__init__()
        self.k, self.fc1, self.fc2 = k, nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.predictor = nn.Sequential(nn.Linear(d, 8, bias=False), nn.Linear(8, ffn, bias=False))

    def forward(self, x):
        idx = torch.topk(self.predictor(x).sum(dim=(0, 1)), self.k).indices
        w1, b1 = torch.index_select(self.fc1.weight, 0, idx), self.fc1.bias.index_select(0, idx)
        return F.linear(F.relu(F.linear(x, w1, b1)), self.fc2.weight.index_select(1, idx), self.fc2.bias)


class EmbeddingGatherMLP(nn.Module):
    """Rows gathered with F.embedding: W1's rows, W2^T's rows, and the bias as a (F, 1) table squeezed back."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, idx):
        w1, w2_t = F.embedding(idx, self.fc1.weight), F.embedding(idx, self.fc2.weight.t())
        b1 = F.embedding(idx, self.fc1.bias[:, None]).squeeze(-1)
        return F.relu(x @ w1.t() + b1) @ w2_t + self.fc2.bias


class TorchGatherMLP(nn.Module):
    """Rows and columns gathered with torch.gather by an index expanded along the other dim."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def forward(self, x, idx):
        d = self.fc1.weight.shape[1]
        w1 = torch.gather(self.fc1.weight, 0, idx[:, None].expand(-1, d))
        w2 = self.fc2.weight.gather(1, idx.unsqueeze(0).expand(d, -1))
        return F.linear(F.relu(F.linear(x, w1)), w2)


class ReluLlamaMLP(nn.Module):
    """ReLU-fied Llama: down(relu(gate(x)) * up(x)), its neurons picked by a predictor or by the MLP itself."""

    def __init__(self, selection: str, d: int = WIDTH, ffn: int = FFN, k: int = ACTIVE):
        super().__init__()
        self.selection, self.k = selection, k
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj, self.predictor = nn.Linear(ffn, d, bias=False), nn.Linear(d, ffn, bias=False)

    def forward(self, x):
        gate = F.relu(self.gate_proj(x))
        if self.selection == "topk_scatter":
            scores = self.predictor(x)
            mask = torch.zeros_like(scores).scatter_(-1, scores.topk(self.k, dim=-1).indices, 1.0)
            h = gate * self.up_proj(x) * mask
        elif self.selection == "active_where":
            h = torch.where(gate > 0, gate * self.up_proj(x), torch.zeros_like(gate))
        else:  # "predictor_threshold"
            h = (gate * self.up_proj(x)).masked_fill(~(torch.sigmoid(self.predictor(x)) > 0.5), 0.0)
        return self.down_proj(h)


class GatheredReluLlamaMLP(nn.Module):
    """The gathered gated form, index_select and w[idx] mixed."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x, idx):
        gate = F.linear(x, self.gate_proj.weight.index_select(0, idx))
        return F.linear(F.relu(gate) * F.linear(x, self.up_proj.weight[idx]), self.down_proj.weight[:, idx])


class PowerInferMLP(nn.Module):
    """PowerInfer-like: an MLP predictor's sigmoid > 0.5 masks fc1's activations."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn, bias=False), nn.Linear(ffn, d, bias=False)
        self.predictor = nn.Sequential(nn.Linear(d, 8, bias=False), nn.ReLU(), nn.Linear(8, ffn, bias=False))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) * (self.predictor(x).sigmoid() > 0.5))


class CatsMergedMLP(nn.Module):
    """CATS-like on a merged gate_up_proj: silu(gate) * up kept where |h| reaches its row's k-th largest."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN, k: int = ACTIVE):
        super().__init__()
        self.k, self.gate_up_proj, self.down_proj = k, nn.Linear(d, 2 * ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        h = F.silu(gate) * up
        return self.down_proj(h * (h.abs() >= h.abs().topk(self.k, dim=-1).values[..., -1:]))


class CatsThresholdMLP(nn.Module):
    """CATS: where(|silu(gate)| > threshold, silu(gate), 0) * up, the threshold a buffer."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.register_buffer("threshold", torch.tensor(0.3))

    def forward(self, x):
        gate = F.silu(self.gate_proj(x))
        return self.down_proj(torch.where(gate.abs() > self.threshold, gate, 0.0) * self.up_proj(x))


class ParameterGatherMLP(nn.Module):
    """DejaVu on raw Parameters: gelu_tanh(x @ w1[idx, :].T + b1[idx]) @ w2[:, idx].T."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(ffn, d) / d ** 0.5), nn.Parameter(0.1 * torch.randn(ffn))
        self.w2 = nn.Parameter(torch.randn(d, ffn) / ffn ** 0.5)

    def forward(self, x, idx):
        return F.gelu(x @ self.w1[idx, :].T + self.b1[idx], approximate="tanh") @ self.w2[:, idx].T


class InPlaceMaskMLP(nn.Module):
    """h.mul_(mask.to(h.dtype)) in place, or torch.masked_fill(h, mask == 0, 0)."""

    def __init__(self, in_place: bool, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.in_place, self.fc1, self.fc2 = in_place, nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, mask):
        h = F.relu(self.fc1(x))
        if self.in_place:
            h.mul_(mask.to(h.dtype))
        else:
            h = torch.masked_fill(h, mask == 0, 0)
        return self.fc2(h)


class DReluMLP(nn.Module):
    """TurboSparse's dReLU: relu(gate) * relu(up), where(predictor > 0, h, zeros_like(h))."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.predictor = nn.Sequential(nn.Linear(d, 8, bias=False), nn.Linear(8, ffn, bias=False))

    def forward(self, x):
        h = F.relu(self.gate_proj(x)) * F.relu(self.up_proj(x))
        return self.down_proj(torch.where(self.predictor(x) > 0, h, torch.zeros_like(h)))


class BoolScatterMLP(nn.Module):
    """A bool mask made by zeros(dtype=bool).scatter_(-1, topk indices, True)."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.fc1, self.fc2, self.predictor = nn.Linear(d, ffn), nn.Linear(ffn, d), nn.Linear(d, ffn, bias=False)

    def forward(self, x):
        scores = self.predictor(x)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=x.device).scatter_(-1, scores.topk(ACTIVE, -1).indices,
                                                                                     True)
        return self.fc2(F.relu(self.fc1(x)) * mask)


class MergedGatheredMLP(nn.Module):
    """Phi-3's merged gate_up_proj gathered: w[:F][idx] and w[F:][idx], silu."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.ffn, self.gate_up_proj, self.down_proj = ffn, nn.Linear(d, 2 * ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def forward(self, x, idx):
        w = self.gate_up_proj.weight
        gate, up = F.linear(x, w[:self.ffn][idx]), F.linear(x, w[self.ffn:][idx])
        return F.linear(F.silu(gate) * up, self.down_proj.weight[:, idx])


class SequenceMaskMLP(nn.Module):
    """One mask per sequence (b, F), broadcast over its tokens by unsqueeze(1), gelu."""

    def __init__(self, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, mask):
        return self.fc2(F.gelu(self.fc1(x)) * mask.unsqueeze(1))


class FATReLUMLP(nn.Module):
    """ProSparse's FATReLU gate: where(g >= t, g, zeros_like(g)) or g.masked_fill(g < t, 0), times up(x)."""

    def __init__(self, spelling: str, threshold: float = 0.1, d: int = WIDTH, ffn: int = FFN):
        super().__init__()
        self.spelling, self.threshold = spelling, threshold
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        g = self.gate_proj(x)
        if self.spelling == "where":
            g = torch.where(g >= self.threshold, g, torch.zeros_like(g))
        else:
            g = g.masked_fill(g < self.threshold, 0)
        return self.down_proj(g * self.up_proj(x))


# -- inputs and cases -------------------------------------------------------------------------------
def tokens(length: int = LENGTH) -> torch.Tensor:
    return torch.randn(BATCH, length, WIDTH)


def keep_mask() -> torch.Tensor:
    """1 where a key is kept: the second sequence right-padded by a random 1-4 positions."""
    keep = torch.ones(BATCH, LENGTH)
    keep[1, LENGTH - int(torch.randint(1, 5, ())):] = 0
    return keep


def heads(kv_heads: int = HEADS, length: int = LENGTH, head_dim: int = 10) -> list[torch.Tensor]:
    return [torch.randn(BATCH, HEADS, length, head_dim)] + [torch.randn(BATCH, kv_heads, length, head_dim)
                                                              for _ in range(2)]


def neurons() -> torch.Tensor:
    return torch.randperm(FFN)[:ACTIVE]


def sliced_mask() -> torch.Tensor:
    """A (b, 1, L, L + 3) float mask, causal with finfo.min, two keys of the second sequence padded."""
    mask = torch.full((LENGTH, LENGTH + 3), torch.finfo(fp32).min).triu(1)[None, None].repeat(BATCH, 1, 1, 1)
    mask[1, ..., 5:7] = torch.finfo(fp32).min
    return mask


def deepseek_inputs(absorb: bool) -> list:
    """(b, s, h, d) heads and a causal mask; absorbed: q_nope (d 16), q_pe (d 8), the kv cache (b, t, 16), the
    mask, the pe cache (b, t, 8)."""
    causal = torch.full((LENGTH, LENGTH), float("-inf")).triu_(1)
    if not absorb:
        return [torch.randn(BATCH, LENGTH, HEADS, 10) for _ in range(3)] + [causal]
    return [torch.randn(BATCH, LENGTH, HEADS, 16), torch.randn(BATCH, LENGTH, HEADS, 8), torch.randn(BATCH, LENGTH, 16),
            causal, torch.randn(BATCH, LENGTH, 8)]


def keep_none_of_one() -> torch.Tensor:
    """keep_mask() with the second sequence all padding."""
    keep = keep_mask()
    keep[1] = 0
    return keep


def neuron_mask(*shape: int) -> torch.Tensor:
    return (torch.rand(*shape, FFN) > 0.6).float()


CASES: dict[str, tuple[Callable, Callable, str, torch.dtype]] = {  # name: (module, inputs, family, dtype)
    "timm_sdpa": (lambda: TimmAttention(fused_attn=True), lambda: [tokens()], "attention", fp16),
    "timm_naive_qk_norm": (lambda: TimmAttention(fused_attn=False, qk_norm=True), lambda: [tokens()], "attention", bf16),
    "x_transformers_padding": (lambda: XTransformersAttention(causal=False), lambda: [tokens(), keep_mask().bool()],
                               "attention", fp16),
    "x_transformers_stable_softmax": (lambda: XTransformersAttention(causal=True, stable=True), lambda: [tokens()],
                                      "attention", bf16),
    "einops_grouped_query": (GroupedEinopsAttention, lambda: heads(kv_heads=2), "attention", fp16),
    "palm_multi_query_einsum": (PaLMMultiQuery, lambda: [tokens()], "attention", fp16),
    "bloom_alibi_baddbmm": (BloomAttention, lambda: [tokens(), 0.1 * torch.randn(BATCH * HEADS, 1, LENGTH)],
                            "attention", fp16),
    "neox_baddbmm_tensor_alpha": (lambda: NeoXAttention("float"), lambda: [tokens(), extended_mask(keep_mask(), fp32)], "attention",
                                  fp32),
    "bert_extended_mask": (BertSelfAttention, lambda: [tokens(), keep_mask()], "attention", bf16),
    "distilbert_expand_as": (DistilBertAttention, lambda: [tokens(), keep_mask()], "attention", fp16),
    "t5_position_bias": (T5Attention, lambda: [tokens(), keep_mask()], "attention", fp32),
    "clip_bmm_views": (ClipAttention, lambda: [tokens(), extended_mask(keep_mask(), fp32)], "attention", fp16),
    "whisper_cross": (WhisperCrossAttention, lambda: [tokens(), tokens(length=17)], "attention", bf16),
    "meta_llama_repeat_kv_bshd": (MetaLlamaAttention, lambda: [tokens()], "attention", fp16),
    "hf_sdpa_expand_causal": (lambda: HFSdpaAttention("expand"), lambda: [tokens()], "attention", fp16),
    "hf_sdpa_enable_gqa_4d_mask": (lambda: HFSdpaAttention("enable_gqa", masked=True), lambda: [tokens(), keep_mask()],
                                   "attention", fp32),
    "nanogpt_tril_buffer": (NanoGPTAttention, lambda: [tokens()], "attention", fp16),
    "swin_shifted_window": (SwinWindowAttention, lambda: [torch.randn(4, 9, WIDTH),
                                                          torch.where(torch.rand(2, 9, 9) > 0.3, 0.0, -100.0)],
                            "attention", fp32),
    "fp32_upcast": (UpcastAttention, heads, "attention", bf16),
    "broadcast_multi_query": (BroadcastMultiQuery, lambda: heads(kv_heads=1), "attention", fp16),
    "diffusers_baddbmm_upcast": (DiffusersAttention, lambda: [tokens()], "attention", fp16),
    "hf_eager_sliced_4d_mask": (HFEagerAttention, lambda: heads() + [sliced_mask()], "attention", fp16),
    "cached_decode_step": (CachedDecodeStep, lambda: heads(length=1) + [torch.randn(BATCH, HEADS, 20, 10)
                                                                     for _ in range(2)], "attention", fp16),
    "sliding_window": (SlidingWindowAttention, heads, "attention", bf16),
    "documented_sdpa_reference": (DocumentedSdpaReference, heads, "attention", fp32),
    "rotary_causal": (RotaryAttention, heads, "attention", bf16),
    "scale_after_padding_mask": (ScaleAfterPaddingMask, lambda: heads() + [keep_mask()], "attention", fp16),
    "transposed_value_einsum": (TransposedValueEinsum, heads, "attention", fp16),
    "tiled_key_value_heads": (TiledKeyValueHeads, lambda: heads(kv_heads=2), "attention", fp16),
    "xsoftmax_zeroed_rows": (XSoftmaxAttention, lambda: heads() + [keep_none_of_one()], "attention", fp16),
    "deepseek_mla_absorb": (lambda: DeepSeekAttention(absorb=True), lambda: deepseek_inputs(absorb=True), "attention",
                            bf16),
    "learned_temperature": (LearnedTemperature, heads, "attention", fp16),
    "cosine_per_head_scale": (CosineAttention, heads, "attention", fp32),
    "dejavu_topk_index_select": (TopkIndexSelectMLP, lambda: [tokens()], "sparse_mlp", fp16),
    "embedding_gathers": (EmbeddingGatherMLP, lambda: [tokens(), neurons()], "sparse_mlp", fp32),
    "torch_gather": (TorchGatherMLP, lambda: [tokens(), neurons()], "sparse_mlp", bf16),
    "relu_llama_topk_scatter": (lambda: ReluLlamaMLP("topk_scatter"), lambda: [tokens()], "sparse_mlp", fp16),
    "relu_llama_active_where": (lambda: ReluLlamaMLP("active_where"), lambda: [tokens()], "sparse_mlp", fp32),
    "relu_llama_predictor_threshold": (lambda: ReluLlamaMLP("predictor_threshold"), lambda: [tokens()], "sparse_mlp",
                                       bf16),
    "relu_llama_gathered": (GatheredReluLlamaMLP, lambda: [tokens(), neurons()], "sparse_mlp", fp16),
    "powerinfer_predictor": (PowerInferMLP, lambda: [tokens()], "sparse_mlp", fp32),
    "cats_merged_gate_up": (CatsMergedMLP, lambda: [tokens()], "sparse_mlp", fp16),
    "cats_threshold_buffer": (CatsThresholdMLP, lambda: [tokens()], "sparse_mlp", fp32),
    "parameter_gathers": (ParameterGatherMLP, lambda: [tokens(), neurons()], "sparse_mlp", fp16),
    "in_place_mask_mul": (lambda: InPlaceMaskMLP(in_place=True), lambda: [tokens(), neuron_mask(BATCH, LENGTH)],
                          "sparse_mlp", fp32),
    "masked_fill_equal_zero": (lambda: InPlaceMaskMLP(in_place=False), lambda: [tokens(), neuron_mask(BATCH, LENGTH)],
                               "sparse_mlp", bf16),
    "drelu_where_zeros_like": (DReluMLP, lambda: [tokens()], "sparse_mlp", fp32),
    "bool_scatter_topk": (BoolScatterMLP, lambda: [tokens()], "sparse_mlp", fp16),
    "merged_gate_up_gathered": (MergedGatheredMLP, lambda: [tokens(), neurons()], "sparse_mlp", fp32),
    "mask_per_sequence": (SequenceMaskMLP, lambda: [tokens(), neuron_mask(BATCH)], "sparse_mlp", fp16),
    "fatrelu_where": (lambda: FATReLUMLP("where"), lambda: [tokens()], "sparse_mlp", fp32),
    "fatrelu_masked_fill": (lambda: FATReLUMLP("masked_fill", threshold=0.0), lambda: [tokens()], "sparse_mlp", bf16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fuses_and_matches_eager(name):
    make, inputs, family, dtype = CASES[name]
    torch.manual_seed(0)
    module = make().eval()
    ours = copy.deepcopy(module).to(dtype)
    reference = copy.deepcopy(module).double()
    compiled = compiler.compile(ours, strict=True)
    for _ in range(2):  # the input it compiles for, then a fresh one
        args = inputs()
        with torch.no_grad():
            result = compiled(*cast_inputs(args, dtype))
            assert_close_by_rule(result, ours(*cast_inputs(args, dtype)), reference(*cast_inputs(args, torch.float64)))
    assert_kernel_ran(compiled, family)


NEAR_MISSES: dict[str, tuple[Callable, Callable, str]] = {  # name: (module, inputs, what report() says)
    "neox_alpha_from_a_buffer": (lambda: NeoXAttention("buffer"), lambda: [tokens(), extended_mask(keep_mask(), fp32)],
                                 "TorchDynamo broke the graph under the softmax"),
    "flex_attention": (FlexCausal, heads, "flex_attention, a higher-order op"),
    "deepseek_scores_bshd_layout": (lambda: DeepSeekAttention(absorb=False), lambda: deepseek_inputs(absorb=False),
                                    "probabilities are permuted after softmax"),
    "xsoftmax_zeroed_by_another_mask": (lambda: XSoftmaxAttention(zero_by="causal"), lambda: heads() + [keep_mask()],
                                        "probabilities zeroed after softmax other than where the one bool mask"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_is_reported_and_exact(name):
    make, inputs, reason = NEAR_MISSES[name]
    torch.manual_seed(0)
    module = make().eval()
    compiled = compiler.compile(module)
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), module(*args), rtol=0, atol=0)
    assert compiled.patterns == [] and reason in compiled.report(), compiled.report()

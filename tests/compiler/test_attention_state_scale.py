"""A scale from module state applied after a mask, as transformers 4.x writes GPT-J and CodeGen:
torch.where(causal_mask, scores, finfo.min), then `/ self.scale_attn` (a buffer or a tensor
attribute), then the padding mask. The scale scales the mask too; the op folds it in and keeps
following it when it changes through `.data`: masked scores stay masked while it stays positive,
a mask it no longer drops is applied with its scaled fill, and a scale that is not positive runs
eager's math. Outputs are held to the tolerance rule against fp64 eager.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import compiler
from tests.compiler.equivalence import cast_inputs
from tests.numerics import assert_close_by_rule


class GPTJAttention(nn.Module):
    """transformers 4.x's GPTJAttention without rotary embeddings or the cache."""

    def __init__(self, hidden_size=64, num_attention_heads=4, max_positions=32, scale_buffer=True):
        super().__init__()
        self.register_buffer(
            "bias",
            torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool)).view(
                1, 1, max_positions, max_positions
            ),
            persistent=False,
        )
        self.register_buffer("masked_bias", torch.tensor(-1e9), persistent=False)

        self.attn_dropout = nn.Dropout(0.1)

        self.embed_dim = hidden_size
        self.num_attention_heads = num_attention_heads
        self.head_dim = self.embed_dim // self.num_attention_heads
        scale_attn = torch.sqrt(torch.tensor(self.head_dim, dtype=torch.float32)).to(torch.get_default_dtype())
        if scale_buffer:
            self.register_buffer("scale_attn", scale_attn, persistent=False)
        else:
            self.scale_attn = scale_attn

        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False)

    def _split_heads(self, tensor, num_attention_heads, attn_head_size):
        new_shape = tensor.size()[:-1] + (num_attention_heads, attn_head_size)
        tensor = tensor.view(new_shape)
        return tensor.permute(0, 2, 1, 3)  # (batch, head, seq_length, head_features)

    def _merge_heads(self, tensor, num_attention_heads, attn_head_size):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        new_shape = tensor.size()[:-2] + (num_attention_heads * attn_head_size,)
        return tensor.view(new_shape)

    def _attn(self, query, key, value, attention_mask=None, head_mask=None):
        # compute causal mask from causal mask buffer
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]

        # Keep the attention weights computation in fp32 to avoid overflow issues
        query = query.to(torch.float32)
        key = key.to(torch.float32)

        attn_weights = torch.matmul(query, key.transpose(-1, -2))

        mask_value = torch.finfo(attn_weights.dtype).min
        # Need to be a tensor, otherwise we get error: `RuntimeError: expected scalar type float but found double`.
        # Need to be on the same device, otherwise `RuntimeError: ..., x and y to be on the same device`
        mask_value = torch.tensor(mask_value, dtype=attn_weights.dtype).to(attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)

        attn_weights = attn_weights / self.scale_attn

        if attention_mask is not None:
            # Apply the attention mask
            attn_weights = attn_weights + attention_mask

        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.to(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)

        # Mask heads if we want to
        if head_mask is not None:
            attn_weights = attn_weights * head_mask

        attn_output = torch.matmul(attn_weights, value)

        return attn_output, attn_weights

    def forward(self, hidden_states, attention_mask=None):
        query = self._split_heads(self.q_proj(hidden_states), self.num_attention_heads, self.head_dim)
        key = self._split_heads(self.k_proj(hidden_states), self.num_attention_heads, self.head_dim)
        value = self._split_heads(self.v_proj(hidden_states), self.num_attention_heads, self.head_dim)
        attn_output, attn_weights = self._attn(query, key, value, attention_mask)
        attn_output = self._merge_heads(attn_output, self.num_attention_heads, self.head_dim)
        return self.out_proj(attn_output)


def padding_mask(batch: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """GPT-J's extended attention mask: 0 where a key is kept, finfo.min where it is padding (the
    last keys of the first row), shaped (batch, 1, 1, length)."""
    keep = torch.ones(batch, length)
    keep[0, -3:] = 0
    return ((1.0 - keep) * torch.finfo(dtype).min)[:, None, None, :]


def run(compiled, module, args, dtype):
    """(ours, eager in dtype, eager in fp64) for one call without autograd."""
    with torch.no_grad():
        return (compiled(*cast_inputs(args, dtype)), module(*cast_inputs(args, dtype)),
                copy.deepcopy(module).double()(*cast_inputs(args, torch.float64)))


@pytest.mark.parametrize("scale_buffer, padding, dtype, length", [
    (True, False, torch.float32, 29),
    (False, True, torch.float32, 17),
    (True, True, torch.bfloat16, 32),
    (False, False, torch.float16, 7),
], ids=["buffer", "attribute-padding", "buffer-padding-bf16", "attribute-fp16"])
def test_gptj_attention_fuses(scale_buffer, padding, dtype, length):
    torch.manual_seed(0)
    module = GPTJAttention(scale_buffer=scale_buffer).eval().to(dtype)
    args = [torch.randn(2, length, 64)] + ([padding_mask(2, length, dtype)] if padding else [])
    compiled = compiler.compile(module, strict=True)
    assert_close_by_rule(*run(compiled, module, args, dtype))
    assert compiled.patterns == ["attention"], compiled.report()
    assert "it scales the mask too" in compiled.report()


@pytest.mark.parametrize("padding", [False, True], ids=["causal", "causal-then-padding"])
def test_gptj_scale_changed_through_data_is_followed(padding):
    """Written behind the version counter: doubled (masked scores stay masked: the kernel), so large
    that the scaled fill no longer drops a score (applied as a fill), negative and zero (eager's
    math in PyTorch), then restored."""
    torch.manual_seed(0)
    module = GPTJAttention(max_positions=16).eval()
    args = [torch.randn(2, 16, 64)] + ([padding_mask(2, 16, torch.float32)] if padding else [])
    compiled = compiler.compile(module, strict=True)
    saved = module.scale_attn.clone()
    for value in (2 * saved, torch.tensor(1e37), -saved, torch.tensor(0.0), saved):
        module.scale_attn.data.copy_(value)
        ours, baseline, reference = run(compiled, module, args, torch.float32)
        if value != 0:
            assert_close_by_rule(ours, baseline, reference)
        else:  # eager divides by zero: +-inf scores, NaN rows; ours the same
            assert torch.equal(ours.isnan(), baseline.isnan())
    assert compiled.patterns == ["attention"]
    (op,) = compiled._report.ops
    assert any("no longer positive" in reason for reason in op.fallbacks), op.fallbacks


def test_scale_from_state_after_a_constant_mask_keeps_the_mask():
    """A causal mask built in forward (no module state) under a buffer's scale: the op receives the
    mask too, so a negative scale still gets eager's answer."""

    class ConstantMaskThenScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("temperature", torch.tensor(4.0))

        def forward(self, q, k, v):
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, torch.finfo(q.dtype).min) / self.temperature
            return torch.softmax(scores, dim=-1) @ v

    module = ConstantMaskThenScale()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 13, 16, generator=generator) for _ in range(3))
    compiled = compiler.compile(module, strict=True)
    for value in (4.0, 0.5, -2.0):
        module.temperature.data.fill_(value)
        assert_close_by_rule(*run(compiled, module, (q, k, v), torch.float32))
    assert compiled.patterns == ["attention"]


class StateScaleOverBias(nn.Module):
    """A buffer scale applied after a run-time additive bias: the bias is scaled by module state too."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.25))

    def forward(self, q, k, v, bias):
        return torch.softmax((q @ k.transpose(-1, -2) + bias) * self.scale, dim=-1) @ v


def test_scale_from_state_after_an_additive_bias():
    module = StateScaleOverBias()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=generator) for _ in range(3))
    bias = torch.randn(1, 1, 9, 9, generator=generator)
    compiled = compiler.compile(module, strict=True)
    for value in (0.25, 0.7, -0.5):
        module.scale.data.fill_(value)
        assert_close_by_rule(*run(compiled, module, (q, k, v, bias), torch.float32))
    assert compiled.patterns == ["attention"]

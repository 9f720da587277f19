"""Training through the attention pass: every spelling's gradients come from the backward kernels.

Each case compiles a module in a dtype, backpropagates a fixed random output gradient, and holds
the gradient of every floating-point input and parameter to the tolerance rule against the same
module in fp64 (NaN exactly where fp64 eager's is); the pass must fire and report() must show no
fallback, so neither the forward nor the backward ran in PyTorch. Train-mode dropout on the weights
is fused: with v = I the output is the dropped-out weights, which gives the keep mask the
reference gradients use, its kept fraction, and its dependence on torch's seed.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from codegen.attention_backward import attention_backward_reference
from models import gpt
from tests.compiler.test_attention_pass import (CausalThenPadding, EinsumAdditive, FairseqPaddingMask, Gemma2SoftCap,
                                                GrokSoftCap, NaiveCausal, RepeatKv, Sdpa, StateScaled, TorchMultihead,
                                                WithMask, qkv)
from tests.numerics import assert_close_by_rule

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


class LearnedBias(nn.Module):
    """T5's relative position bias: a learned (heads, L, L) bias added to the unscaled scores."""

    def __init__(self, heads: int, length: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(heads, length, length) * 0.5)

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) + self.bias, dim=-1) @ v


def padding(batch: int, length: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, length // 2:] = True
    return mask


def padding_bias(batch: int, length: int) -> torch.Tensor:
    """0 for kept keys, -inf for the padding (batch, 1, 1, length)."""
    return torch.zeros(batch, 1, 1, length).masked_fill(padding(batch, length)[:, None, None], float("-inf"))


CASES = {  # name -> (module, inputs, dtype)
    "naive_causal_bottom_right": (NaiveCausal(), qkv(1, 2, 17, 33, 59), fp16),
    "naive_causal_q1": (NaiveCausal(), qkv(2, 2, 1, 17, 16), fp32),
    "sdpa_one_query_long_cache": (Sdpa(), qkv(1, 2, 1, 300, 16), fp32),  # decode's shape: FA2 trains it
    "einsum_additive_causal": (EinsumAdditive(), qkv(1, 2, 33, 33, 80), bf16),
    "sdpa_causal_gqa": (Sdpa(is_causal=True, enable_gqa=True), qkv(2, 4, 33, 33, 16, kv_heads=1), fp32),
    "sdpa_bool_mask": (Sdpa(), [*qkv(1, 2, 17, 33, 16), torch.rand(17, 33) > 0.3], fp16),
    "runtime_additive_mask_requires_grad": (WithMask(), [*qkv(2, 2, 17, 17, 16), torch.randn(2, 1, 17, 17)], fp32),
    "runtime_bool_mask_finfo_fill": (WithMask(), [*qkv(1, 2, 33, 17, 16), torch.rand(1, 1, 33, 17) > 0.7], fp32),
    "repeat_interleave_gqa": (RepeatKv(), qkv(1, 4, 17, 17, 32, kv_heads=2), bf16),
    "fairseq_regrouped_padding": (FairseqPaddingMask(), [*qkv(2, 2, 17, 17, 16), padding(2, 17)], fp32),
    "causal_then_padding_chain": (CausalThenPadding(), [*qkv(2, 2, 17, 17, 16), padding_bias(2, 17)], fp32),
    "gemma2_softcap_mask": (Gemma2SoftCap(), [*qkv(1, 2, 17, 17, 16), torch.zeros(17, 17).masked_fill(
        torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf"))], fp32),
    "grok_softcap_causal": (GrokSoftCap(), qkv(1, 2, 33, 33, 16), fp16),
    "state_scaled": (StateScaled(16), qkv(1, 2, 17, 17, 16), fp32),
    "t5_learned_bias": (LearnedBias(2, 17), qkv(1, 2, 17, 17, 16), fp32),
    "multihead_padding": (TorchMultihead(embed_dim=32, heads=2), [torch.randn(2, 17, 32), None, padding(2, 17)], fp32),
}


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_fp64(name):
    module, inputs, dtype = CASES[name]
    compiled, ours, baseline, reference = gradients_three_ways(module, inputs, dtype)
    assert compiled.patterns == ["attention"], compiled.report()
    assert "ran in PyTorch" not in compiled.report(), compiled.report()
    for index, (mine, base, ref) in enumerate(zip(ours, baseline, reference, strict=True)):
        nan = ref.isnan()
        assert torch.equal(mine.isnan(), nan), f"gradient {index}: NaN-ness differs"
        assert_close_by_rule(mine.masked_fill(nan, 0), base.masked_fill(nan, 0), ref.masked_fill(nan, 0))


def test_a_fully_masked_row_gives_eager_gradients():
    """masked_fill(-inf) rows: NaN weights in eager, so dv is NaN and the row's dq is 0; SDPA gives zeros."""
    q, k, v = qkv(1, 2, 17, 17, 16)
    mask = torch.zeros(1, 1, 17, 17, dtype=torch.bool)
    mask[..., 3, :] = True
    for module, expect_nan in ((InPlaceMasked(), True), (Sdpa(), False)):
        inputs = [q, k, v, mask if expect_nan else ~mask]
        compiled, ours, _, reference = gradients_three_ways(module, inputs, fp32)
        assert "ran in PyTorch" not in compiled.report(), compiled.report()
        dq, _, dv = ours
        assert dv.isnan().all() == expect_nan and not dq.isnan().any() and (dq[:, :, 3] == 0).all()
        torch.testing.assert_close(dq, reference[0].float(), atol=1e-5, rtol=1e-4)


class InPlaceMasked(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(mask, float("-inf")), dim=-1) @ v


# -- dropout -------------------------------------------------------------------------------


class NaiveDropout(nn.Module):
    """softmax, nn.Dropout (train mode), then the product with v."""

    def __init__(self, p: float):
        super().__init__()
        self.dropout = nn.Dropout(p)

    def forward(self, q, k, v):
        return self.dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)) @ v


class FunctionalDropout(nn.Module):
    """Hugging Face's eager attention: F.dropout(weights, p, training=self.training), causal."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        weights = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32)
        return F.dropout(weights, p=0.25, training=self.training).to(q.dtype) @ v


DROPOUT_SPELLINGS = {
    "nn_dropout": (NaiveDropout(0.25), False),
    "functional_dropout": (FunctionalDropout(), True),
    "sdpa_dropout_p": (Sdpa(dropout_p=0.25), False),
}


@pytest.mark.parametrize("name", DROPOUT_SPELLINGS)
def test_dropout_is_fused_and_the_backward_reuses_its_mask(name):
    """v = I: the output is the dropped weights, so out != 0 is the keep mask the reference's gradients
    use; a backward that drew other bits than the forward would be far from it."""
    module, causal = DROPOUT_SPELLINGS[name]
    module.train()
    q, k, _ = qkv(2, 2, 48, 48, 16)
    v = torch.eye(48).expand(2, 2, 48, 48)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = compiler.compile(copy.deepcopy(module), strict=True)
    out = compiled(*leaves)
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, dout)
    assert compiled.patterns == ["attention"] and "dropout p=0.25" in compiled.report(), compiled.report()
    assert "ran in PyTorch" not in compiled.report(), compiled.report()
    keep = out != 0
    kept = keep.sum().item() / (keep.numel() * (0.5 + 0.5 / 48 if causal else 1))
    assert abs(kept - 0.75) < 5 * math.sqrt(0.25 * 0.75 / keep.numel() * 2)
    options = dict(scale=0.25, causal=causal, dropout_p=0.25, dropout_keep=keep)
    reference = attention_backward_reference(q.double(), k.double(), v.double(), dout.double(), **options)
    baseline = attention_backward_reference(q, k, v, dout, **options)
    for mine, base, ref in zip(ours, baseline, reference, strict=True):
        assert_close_by_rule(mine, base, ref)


def test_dropout_follows_torchs_seed_and_eval_mode_drops_it():
    model, (ids,) = gpt.example(gpt.GPTConfig.tiny(dropout=0.1, n_layer=1), batch=1, length=32)
    model.train()
    compiled = compiler.compile(model, strict=True)

    def logits(seed):
        torch.manual_seed(seed)
        return compiled(ids)

    first = logits(1)
    first.float().square().mean().backward()
    assert compiled.patterns == ["attention"] and "dropout p=0.1" in compiled.report(), compiled.report()
    assert "ran in PyTorch" not in compiled.report(), compiled.report()
    with torch.no_grad():
        assert torch.equal(logits(1), first) and not torch.equal(logits(2), first)
        model.eval()
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)


def test_transformer_encoder_layer_trains_through_multihead_attention_with_dropout():
    """In train mode nn.TransformerEncoderLayer leaves its fast path: nn.MultiheadAttention's op, dropout 0.1."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).train()
    x = torch.randn(2, 17, 32, requires_grad=True)
    compiled = compiler.compile(layer, strict=True)
    compiled(x).square().sum().backward()
    assert compiled.patterns == ["attention"] and "dropout p=0.1" in compiled.report(), compiled.report()
    assert "ran in PyTorch" not in compiled.report() and torch.isfinite(x.grad).all()


def test_hugging_face_gpt2_trains_with_its_attention_dropout_fused():
    """GPT-2's eager attention in train mode: attn_pdrop 0.1 fused in both layers, the backward in kernels."""
    transformers = pytest.importorskip("transformers")
    from tests.compiler.test_hf_models import gpt2

    torch.manual_seed(0)
    model = gpt2("eager").train()
    ids = torch.randint(0, 128, (2, 17))
    compiled = compiler.compile(model, strict=True)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert isinstance(model, transformers.GPT2LMHeadModel) and compiled.patterns == ["attention", "attention"]
    assert compiled.report().count("dropout p=0.1") == 2 and "ran in PyTorch" not in compiled.report()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- helpers -------------------------------------------------------------------------------


def gradients_three_ways(module, inputs, dtype):
    """(compiled module, gradients of ours in dtype, eager in dtype, eager in fp64): of every floating
    input and parameter, for one fixed random output gradient."""
    compiled = compiler.compile(copy.deepcopy(module).to(dtype), strict=True)
    ours = _gradients(compiled, compiled.model, inputs, dtype)
    baseline = _gradients(copy.deepcopy(module).to(dtype), None, inputs, dtype)
    reference = _gradients(copy.deepcopy(module).double(), None, inputs, torch.float64)
    return compiled, ours, baseline, reference


def _gradients(run, parameters_of, inputs, dtype):
    module = parameters_of or run
    leaves = [t.to(dtype).requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    out = run(*leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad] + list(module.parameters())
    return torch.autograd.grad(out, wrt, dout)


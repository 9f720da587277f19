"""What the compiler does not fuse keeps running in PyTorch, correctly, and says why."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from tests.compiler.test_attention_pass import qkv


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x):
        y = torch.cumsum(self.linear(x), dim=-1)
        return torch.sort(y, dim=-1).values.sin()


class TwoDropouts(nn.Module):
    """Train-mode dropout applied twice to the weights (one is fused: tests/training/test_train_attention.py)."""

    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return F.dropout(F.dropout(probs, p=0.5, training=True), p=0.1, training=True) @ v


class ReturnsWeights(nn.Module):
    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return probs @ v, probs


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


class ProbabilitiesResplit(nn.Module):
    """Probabilities reshaped to another query/key split before the value matmul: not a regrouping."""

    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        b, h, lq, lk = probs.shape
        return probs.reshape(b, h, 2 * lq, lk // 2) @ v


class ThreeMasks(nn.Module):
    """A causal masked_fill, a padding bias and a bias: three masks, more than the op combines."""

    def forward(self, q, k, v):
        lq, lk = q.shape[-2], k.shape[-2]
        scores = q @ k.transpose(-1, -2)
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
        padding = torch.zeros(lk)
        padding[-2:] = float("-inf")
        return torch.softmax(scores + padding * q.sum() + q.mean(), dim=-1) @ v


class TwoMasksSoftFill(nn.Module):
    """A padding bias and then a masked_fill with -100, which weights those keys instead of dropping them."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) + q.sum(dim=-1, keepdim=True)
        return torch.softmax(scores.masked_fill(k[..., 0].unsqueeze(-2) > 1, -100.0), dim=-1) @ v


class MultiheadWeightsRead(nn.Module):
    """nn.MultiheadAttention whose averaged attention weights the model returns."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, q, k, v):
        x = q.flatten(1, 2)[:, :, :16]
        out, weights = self.attention(x, x, x)
        return out, weights


class DividedByZero(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 0.0, dim=-1) @ v


class MaskUnderSoftCap(nn.Module):
    """A bias added before the tanh: the cap would bound the mask too, so it no longer drops keys."""

    def forward(self, q, k, v):
        scores = 5.0 * torch.tanh((q @ k.transpose(-1, -2) + q.mean()) / 5.0)
        return torch.softmax(scores, dim=-1) @ v


class TwiceSoftCapped(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(torch.tanh(torch.tanh(q @ k.transpose(-1, -2))), dim=-1) @ v


class ScoresObservedBeforeMasking(nn.Module):
    """The unmasked scores are returned too: masked_fill_ on them is observable, not a mask."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        raw = scores * 1.0
        scores.masked_fill_(k[..., 0].unsqueeze(-2) > 1, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v, raw


class AttentionSinks(nn.Module):
    """GPT-OSS's sinks: one extra logit per head joins the softmax, then its column is dropped."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        sinks = torch.ones(1, q.shape[1], 1, 1).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1] @ v


class Float64Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def run_both(module, *args):
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        return compiled, compiled(*args), module(*args)


def test_model_without_attention_runs_unchanged():
    module = NoAttention().eval()
    compiled, ours, eager = run_both(module, torch.randn(3, 5, 16))
    torch.testing.assert_close(ours, eager)
    assert compiled.patterns == [] and compiled.kernels == []


@pytest.mark.parametrize("module,reason", [
    (ReturnsWeights(), "also read by"),
    (SoftmaxOverQueries(), "not over the last"),
    (Float64Attention(), "float64"),
    (ThreeMasks(), "more than 2 masks"),
    (DividedByZero(), "scores divided by zero"),
    (MultiheadWeightsRead(), "the attention weights are read"),
    (TwoMasksSoftFill(), "which does not drop them"),
    (MaskUnderSoftCap(), "a mask under the softcap's tanh"),
    (TwiceSoftCapped(), "tanh applied twice"),
    (ScoresObservedBeforeMasking(), "masked_fill_ between QK^T and softmax is neither a scale nor a mask"),
    (AttentionSinks(), "probabilities are sliced after softmax"),
])
def test_near_misses_fall_back_and_are_reported(module, reason):
    compiled, ours, eager = run_both(module, *qkv(1, 2, 9, 9, 16))
    torch.testing.assert_close(ours, eager, equal_nan=True)
    assert "attention" not in compiled.patterns
    assert reason in compiled.report()


def test_probabilities_resplit_are_left_to_pytorch():
    q, k, _ = qkv(1, 2, 6, 8, 16)
    compiled, ours, eager = run_both(ProbabilitiesResplit(), q, k, torch.randn(1, 2, 4, 16))
    torch.testing.assert_close(ours, eager)
    assert "attention" not in compiled.patterns
    assert "beyond regrouping the batch dims" in compiled.report()


def test_dropout_applied_twice_is_left_to_pytorch():
    compiled, _, _ = run_both(TwoDropouts(), *qkv(1, 2, 9, 9, 16))
    assert "attention" not in compiled.patterns
    assert "dropout applied twice" in compiled.report()


class Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_mismatched_head_dims_raise_a_clear_error():
    q, k, v = qkv(1, 2, 9, 9, 16)
    with pytest.raises(Exception, match="16|8"):
        compiler.compile(Sdpa())(q, k[..., :8], v)


def test_compile_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        compiler.compile(lambda x: x)


def test_grad_mode_runs_the_kernel_and_keeps_autograd():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 9, 9, 16))
    compiled = compiler.compile(Sdpa())
    out = compiled(q, k, v)
    out.sum().backward()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=True)
    expected.sum().backward()
    torch.testing.assert_close(out.detach(), expected.detach())
    for ours, eager in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad, eager.grad)
    assert "ran in PyTorch" not in compiled.report(), compiled.report()  # forward and backward kernels ran

"""report() is never silent about a family's anchor that nothing fused (compiler/passes/unmatched.py),
and says nothing about dense layers that are no candidate at all."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler


class GatheredAfterDense(nn.Module):
    """The activations of a dense up projection gathered, fc2(relu(fc1(x))[..., idx]) with W2[:, idx]
    (the gated PowerInfer form, down(relu(gate(x)) * up(x) * mask), fuses now)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x, idx):
        return F.linear(F.relu(self.fc1(x))[..., idx], self.fc2.weight[:, idx], self.fc2.bias)


class DenseSwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 24), nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ScaledByTensorAttention(nn.Module):
    """Scores scaled by a run-time tensor (CLIP's logit_scale.exp()) before a softmax."""

    def forward(self, q, k, v, logit_scale):
        scores = (q @ k.transpose(-2, -1)) * logit_scale.exp()
        return torch.softmax(scores, dim=-1) @ v


class ScanWithInitialState(nn.Module):
    """A recurrence from a carried, non-zero state, one step written out (h = exp(ΔA) h + ΔBu)."""

    def forward(self, h, delta, A, B, u):
        h = torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * B[:, None, :]
        return h * 2


CASES = [
    (GatheredAfterDense, lambda: (torch.randn(4, 8), torch.randperm(24)[:6]), "sparse_mlp"),
    (ScaledByTensorAttention, lambda: (*(torch.randn(1, 2, 8, 16) for _ in range(3)), torch.tensor(0.3)),
     "attention"),
    (ScanWithInitialState, lambda: (torch.randn(2, 5, 4), torch.rand(2, 5), -torch.rand(5, 4), torch.randn(2, 4),
                                    torch.randn(2, 5)), "ssm_scan"),
]


@pytest.mark.parametrize("model,inputs,pattern", CASES, ids=[case[0].__name__ for case in CASES])
def test_an_anchor_nothing_fused_is_reported(model, inputs, pattern):
    args, eager = inputs(), model()
    compiled = compiler.compile(eager)
    torch.testing.assert_close(compiled(*args), eager(*args), rtol=1e-5, atol=1e-5)
    assert compiled.patterns == []
    assert f"{pattern} at " in compiled.report(), compiled.report()


def test_dense_gated_mlp_is_not_reported_as_sparse():
    compiled = compiler.compile(DenseSwiGLU())
    compiled(torch.randn(4, 8))
    assert "sparse_mlp" not in compiled.report()

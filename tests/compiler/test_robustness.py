"""Robustness of compiled attention: odd layouts, special values, shape changes, property tests."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compiler
from tests.compiler.test_attention_pass import NaiveCausal, Sdpa, WithMask, qkv
from tests.numerics import assert_close_by_rule


def run(module, *args):
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        return compiled, compiled(*args), module(*args)


def assert_same_special_values(ours, eager):
    """NaN and inf exactly where eager has them, the tolerance rule elsewhere."""
    assert torch.equal(ours.isnan(), eager.isnan())
    assert torch.equal(ours.isinf(), eager.isinf())
    finite = eager.isfinite()
    reference = eager.double().where(finite, 0)
    assert_close_by_rule(ours.where(finite, 0), eager.where(finite, 0), reference)


def test_non_contiguous_and_channels_last_inputs():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(2, 3, 37, 37, 64))
    assert not q.is_contiguous()
    compiled, ours, eager = run(NaiveCausal(), q, k, v.contiguous(memory_format=torch.channels_last))
    assert compiled.patterns == ["attention"]
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("operand", [0, 1, 2])
def test_nan_and_inf_propagate_like_eager(value, operand):
    args = list(qkv(1, 2, 19, 19, 32))
    args[operand][0, 0, 7, 3] = value
    compiled, ours, eager = run(NaiveCausal(), *args)
    assert compiled.patterns == ["attention"]
    assert_same_special_values(ours, eager)


def test_fully_masked_rows_match_eager_for_naive_and_sdpa():
    q, k, v = qkv(1, 2, 9, 9, 16)
    drop = torch.zeros(9, 9, dtype=torch.bool)
    drop[4] = True
    _, ours, eager = run(WithMask(), q, k, v, drop)
    assert_same_special_values(ours, eager)
    _, ours, eager = run(Sdpa(), q, k, v, ~drop)
    assert (ours[:, :, 4] == 0).all()
    assert_same_special_values(ours, eager)


@pytest.mark.parametrize("dynamic,graphs", [(False, 3), (None, 2)])
def test_shape_change_mid_run_recompiles(dynamic, graphs):
    """Static: one graph per length. Automatic dynamic: the second length makes the size symbolic."""
    module = NaiveCausal()
    compiled = compiler.compile(module, dynamic=dynamic, strict=True)
    with torch.no_grad():
        for length in (5, 33, 5, 70):
            args = qkv(1, 2, length, length, 16)
            torch.testing.assert_close(compiled(*args), module(*args), atol=1e-5, rtol=1e-5)
    assert compiled.patterns.count("attention") == graphs


def test_head_dim_beyond_kernel_is_left_to_pytorch():
    compiled, ours, eager = run(Sdpa(), *qkv(1, 1, 8, 8, 320))
    assert compiled.patterns == []
    assert "exceeds the kernel" in compiled.report()
    torch.testing.assert_close(ours, eager)


def test_mixed_dtypes_raise_like_eager():
    q, k, v = qkv(1, 2, 8, 8, 16)
    with pytest.raises(Exception):
        NaiveCausal()(q.half(), k, v)
    with pytest.raises(Exception):
        compiler.compile(NaiveCausal())(q.half(), k, v)


class ScaledMasked(nn.Module):
    def __init__(self, scale: float, causal: bool):
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        if self.causal:
            lq, lk = scores.shape[-2:]
            scores = scores + torch.full((lq, lk), -math.inf).triu(lk - lq + 1)
        return F.softmax(scores, dim=-1) @ v


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    q_len=st.integers(1, 70),
    extra_kv=st.integers(0, 40),
    head_dim=st.integers(1, 80),
    scale=st.floats(0.5, 20.0),
    causal=st.booleans(),
)
def test_property_attention_matches_eager(batch, heads, q_len, extra_kv, head_dim, scale, causal):
    torch._dynamo.reset()
    args = qkv(batch, heads, q_len, q_len + extra_kv, head_dim, seed=q_len * 131 + head_dim)
    module = ScaledMasked(scale, causal)
    compiled, ours, eager = run(module, *args)
    assert compiled.patterns == ["attention"]
    reference = module(*(a.double() for a in args))
    assert_close_by_rule(ours, eager, reference)

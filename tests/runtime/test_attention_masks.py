"""runtime.attention.combined_bias: masks applied in turn as one additive bias, and when that is exact."""
from __future__ import annotations

import math

import torch

from runtime.attention import MaskForm, combined_bias

CAUSAL_WHERE = MaskForm(kind="bool", keep_when=True, fill_value=torch.finfo(torch.float32).min)
ADDITIVE = MaskForm(kind="additive")


def causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def padding_bias(length: int, padded: int) -> torch.Tensor:
    bias = torch.zeros(1, length)
    bias[:, length - padded:] = -math.inf
    return bias


def test_causal_then_padding_is_exact_and_drops_both():
    bias, why_not = combined_bias([causal(6), padding_bias(6, 2)], (CAUSAL_WHERE, ADDITIVE))
    assert why_not is None
    expected = torch.zeros(6, 6).masked_fill(~causal(6), -math.inf) + padding_bias(6, 2)
    torch.testing.assert_close(bias, expected)


def test_a_fill_that_does_not_drop_is_not_exact():
    soft = MaskForm(kind="bool", keep_when=True, fill_value=-100.0)
    assert combined_bias([causal(6)], (soft,))[1] is not None


def test_a_later_bias_that_lifts_dropped_scores_is_not_exact():
    fill_minus_1e5 = MaskForm(kind="bool", keep_when=True, fill_value=-1e5)
    lifted = torch.zeros(1, 6)
    lifted[0, 5] = 1e5
    assert "rises above" in combined_bias([causal(6), lifted], (fill_minus_1e5, ADDITIVE))[1]


def test_a_row_without_visible_keys_is_not_exact():
    everything_padded = padding_bias(6, 6)
    assert "no clearly visible key" in combined_bias([causal(6), everything_padded], (CAUSAL_WHERE, ADDITIVE))[1]


def test_nan_in_a_mask_is_not_exact():
    nan_bias = torch.zeros(6, 6)
    nan_bias[2, 3] = math.nan
    assert "NaN" in combined_bias([causal(6), nan_bias], (CAUSAL_WHERE, ADDITIVE))[1]

"""runtime.attention's masks: combined_bias, masks applied in turn as one additive bias, and when that
is exact; the byte compare that keeps a folded mask's fast path."""
from __future__ import annotations

import math

import torch

from runtime.attention import MaskForm, _same_bytes_test, combined_bias

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


def test_the_folded_mask_test_is_a_byte_compare_in_words_where_the_layout_allows():
    buffer = causal(40)
    folded = buffer[:32, :32].clone()
    holds = _same_bytes_test(buffer[:32, :32], folded)  # rows of 32 bytes, strides of 40: whole words
    assert holds(buffer[:32, :32])
    written = buffer.clone()
    written[31, 31] = False
    assert not holds(written[:32, :32])
    shifted = torch.empty(1 + 32 * 40, dtype=torch.bool)[1:].view(32, 40)[:, :32].copy_(folded)
    assert torch.equal(shifted, folded) and not holds(shifted)  # starting inside a word: no view, no claim
    assert not holds(torch.zeros(32, 32, dtype=torch.bool))
    zero = torch.zeros(4, 8)
    assert not _same_bytes_test(zero, zero.clone())(-zero)  # equal values in other bytes


def test_the_folded_mask_test_compares_values_where_rows_are_not_whole_words():
    buffer = causal(40)
    holds = _same_bytes_test(buffer[:29, :29], buffer[:29, :29].clone())
    assert holds(buffer[:29, :29])
    assert not holds(causal(29).logical_not())
    zero = torch.zeros(3, 5)
    assert _same_bytes_test(zero, zero.clone())(-zero)  # torch.equal: -0.0 == 0.0

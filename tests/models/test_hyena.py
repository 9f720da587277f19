"""The Hyena reference model (models/hyena.py): the operator against direct convolutions, the implicit
filter's construction, its size (shapes, causality and the FFT convolution itself: test_lm.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import hyena
from models.hyena import HyenaConfig, HyenaLM, HyenaOperator
from tests.models.test_lm import direct_causal_conv


def test_operator_is_gated_long_convolution_of_short_convolved_projections():
    """out_proj(x0 * (conv(v * x1, h) + bias * v * x1)) with x0, x1, v from the short filter."""
    torch.manual_seed(0)
    config = HyenaConfig.tiny()
    op = HyenaOperator(config).double()
    x = torch.randn(2, 50, config.d_model, dtype=torch.float64)
    with torch.no_grad():
        projected = op.in_proj(x).transpose(1, 2)
        width = config.short_filter_order
        short = F.conv1d(F.pad(projected, (width - 1, 0)), op.short_filter.weight, op.short_filter.bias,
                         groups=projected.shape[1])
        x0, x1, v = short.split(config.d_model, dim=1)
        h = op.filter_fn.filter(50)[0].transpose(0, 1)
        gated = v * x1
        y = direct_causal_conv(gated, h) + gated * op.filter_fn.bias[:, None]
        expected = op.out_proj((x0 * y).transpose(1, 2))
        torch.testing.assert_close(op(x), expected)


def test_implicit_filter_is_computed_per_call_and_consistent_across_lengths():
    model, _ = hyena.tiny()
    filter_fn = model.blocks[0].mixer.filter_fn
    with torch.no_grad():
        long, short = filter_fn.filter(100)[0], filter_fn.filter(30)[0]
    assert long.shape == (100, model.config.d_model)
    torch.testing.assert_close(short, long[:30])


def test_implicit_filter_window_decays_to_one_percent_between_0_3_and_1_5_l_max():
    model, _ = hyena.tiny()
    modulation = model.blocks[0].mixer.filter_fn.modulation
    t = torch.tensor([0.0, 0.3, 1.0, 1.5])[None, :, None]
    window = modulation(t, torch.ones(1, 4, model.config.d_model))[0]
    assert (window[0] == 1).all()
    assert (window[1:] < window[:-1]).all()
    torch.testing.assert_close(window[1, -1], torch.tensor(1e-2))
    torch.testing.assert_close(window[3, 0], torch.tensor(1e-2))


def test_rejects_sequences_longer_than_l_max():
    model, _ = hyena.tiny()
    with pytest.raises(ValueError, match="exceeds l_max"):
        model(torch.zeros(1, model.config.l_max + 1, dtype=torch.int64))


def test_hyena_150m_config_is_in_the_150m_class():
    with torch.device("meta"):
        model = HyenaLM(HyenaConfig.hyena_150m())
    params = sum(p.numel() for p in model.parameters())
    assert 140e6 < params < 180e6

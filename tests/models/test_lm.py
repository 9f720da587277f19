"""What the H3 and Hyena language models share (models/lm.py), checked on both: the tiny factories,
causality, and each model's own spelling of the FFT convolution against a direct convolution."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import h3, hyena

MODELS = {
    "h3": (h3.tiny, h3.H3LM, h3.fftconv_ref),
    "hyena": (hyena.tiny, hyena.HyenaLM, hyena.fftconv),
}


def direct_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[b, h, t] = sum_{s <= t} k[h, t - s] u[b, h, s], as a depthwise conv1d with the filter flipped."""
    seqlen, channels = u.shape[-1], u.shape[1]
    return F.conv1d(F.pad(u, (seqlen - 1, 0)), k.flip(-1)[:, None, :], groups=channels)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_factory_gives_an_eval_model_and_token_ids(name):
    tiny, lm_class, _ = MODELS[name]
    model, (ids,) = tiny()
    assert isinstance(model, lm_class) and not model.training
    assert ids.shape == (2, 64) and ids.dtype == torch.int64
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 64, model.config.vocab_size)
    assert logits.isfinite().all()


@pytest.mark.parametrize("name", MODELS)
def test_lm_is_causal(name):
    model, (ids,) = MODELS[name][0]()
    changed = ids.clone()
    changed[:, 40:] = (ids[:, 40:] + 1) % model.config.vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :40], after[:, :40], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[:, 40:], after[:, 40:])


@pytest.mark.parametrize("name", MODELS)
def test_fftconv_is_a_causal_convolution_plus_skip(name):
    fftconv = MODELS[name][2]
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 5, 37, generator=g, dtype=torch.float64)
    k = torch.randn(5, 37, generator=g, dtype=torch.float64)
    D = torch.randn(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fftconv(u, k, D), direct_causal_conv(u, k) + u * D[:, None])

"""The Mamba reference model (models/mamba.py): shapes, causality, and its two scan references
checked against independent formulations (the materialised quadratic form, and stepping)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.mamba import (
    MambaBlock,
    MambaConfig,
    MambaLM,
    selective_scan_ref,
    selective_state_update_ref,
)


def scan_inputs(batch=2, dim=6, seqlen=9, dstate=3, groups=0, seed=0):
    """float64 inputs at Mamba's scales; groups 0 means B, C of shape (b, n, L)."""
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, groups, dstate, seqlen) if groups else (batch, dstate, seqlen)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64),
        delta=torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64),
        A=-torch.rand(dim, dstate, generator=g, dtype=torch.float64) * 4 - 0.5,
        B=torch.randn(*bc_shape, generator=g, dtype=torch.float64),
        C=torch.randn(*bc_shape, generator=g, dtype=torch.float64),
        D=torch.randn(dim, generator=g, dtype=torch.float64),
        z=torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64),
        delta_bias=torch.randn(dim, generator=g, dtype=torch.float64) - 3,
    )


def quadratic_form(u, delta, A, B, C, D, z, delta_bias):
    """y_t = sum_{s<=t} C_t · exp(A (cumΔ_t - cumΔ_s)) Δ_s B_s u_s + D u_t, gated: every state materialised."""
    delta = F.softplus(delta + delta_bias[:, None])
    dim = u.shape[1]
    if B.dim() == 4:
        B, C = (t.repeat_interleave(dim // t.shape[1], dim=1) for t in (B, C))
    else:
        B, C = B[:, None].expand(-1, dim, -1, -1), C[:, None].expand(-1, dim, -1, -1)
    cum = delta.cumsum(-1)
    gaps = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(gaps.shape[-2:], dtype=torch.bool).tril()
    decay = torch.exp(A[None, :, :, None, None] * gaps[:, :, None]).where(causal, 0.0)
    inputs = (delta * u)[:, :, None, :] * B
    states = torch.einsum("bdnts,bdns->bdnt", decay, inputs)
    y = torch.einsum("bdnt,bdnt->bdt", states, C) + D[:, None] * u
    return y * F.silu(z), states[..., -1]


@pytest.mark.parametrize("groups", [0, 1, 3])
def test_scan_ref_matches_quadratic_form(groups):
    inputs = scan_inputs(groups=groups)
    out, last_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    expected_out, expected_state = quadratic_form(**inputs)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(last_state, expected_state)


@pytest.mark.parametrize("groups", [0, 2])
def test_state_update_ref_steps_through_the_scan(groups):
    inputs = scan_inputs(groups=groups)
    u, delta, z, B, C = (inputs.pop(name) for name in ("u", "delta", "z", "B", "C"))
    expected, expected_state = selective_scan_ref(u, delta, B=B, C=C, z=z, **inputs, delta_softplus=True,
                                                  return_last_state=True)
    A, D, dt_bias = inputs["A"], inputs["D"], inputs["delta_bias"]
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    steps = [selective_state_update_ref(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D=D, z=z[..., t],
                                        dt_bias=dt_bias, dt_softplus=True)
             for t in range(u.shape[-1])]
    torch.testing.assert_close(torch.stack(steps, dim=-1), expected)
    torch.testing.assert_close(state, expected_state)


def test_scan_ref_keeps_input_dtype_and_computes_in_fp32():
    inputs = {name: t.to(torch.bfloat16) for name, t in scan_inputs().items()}
    out = selective_scan_ref(**inputs, delta_softplus=True)
    fp32 = selective_scan_ref(**{name: t.float() for name, t in inputs.items()}, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fp32.to(torch.bfloat16), rtol=0, atol=0)


def test_tiny_config():
    config = MambaConfig.tiny()
    assert (config.d_model, config.n_layer, config.d_state, config.vocab_size) == (32, 2, 4, 64)
    assert (config.d_inner, config.dt_rank) == (64, 2)


@pytest.mark.parametrize("config, params", [(MambaConfig.mamba_130m(), 129.14e6), (MambaConfig.mamba_370m(), 371.52e6)])
def test_real_size_configs_have_their_parameter_counts(config, params):
    with torch.device("meta"):
        model = MambaLM(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-4)


def test_block_and_lm_shapes():
    torch.manual_seed(0)
    config = MambaConfig.tiny()
    block = MambaBlock(config)
    assert block(torch.randn(2, 9, config.d_model)).shape == (2, 9, config.d_model)
    model = MambaLM(config).eval()
    logits = model(torch.randint(0, config.vocab_size, (2, 9)))
    assert logits.shape == (2, 9, config.vocab_size)
    assert torch.isfinite(logits).all()
    assert model.lm_head.weight is model.embedding.weight


@pytest.mark.parametrize("rms_norm", [True, False])
def test_lm_is_causal(rms_norm):
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=64, d_state=4, rms_norm=rms_norm)
    model = MambaLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (tokens[:, 7:] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :7], before[:, :7])
    assert not torch.allclose(after[:, 7:], before[:, 7:])

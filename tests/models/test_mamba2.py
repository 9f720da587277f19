"""The Mamba-2 reference (models/mamba2.py): its chunked, einops and recurrent SSD spellings and its
decode step compute one map, checked in fp64 against each other."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import mamba2

SPELLINGS = [name for name in mamba2.SCANS if name != "einops" or mamba2.einops is not None]


def ssd_inputs(batch=2, seqlen=12, heads=3, headdim=4, dstate=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = F.softplus(torch.randn(batch, seqlen, heads, generator=g, dtype=torch.float64))
    A = -torch.rand(heads, generator=g, dtype=torch.float64) - 0.5
    x = torch.randn(batch, seqlen, heads, headdim, generator=g, dtype=torch.float64)
    B, C = (torch.randn(batch, seqlen, heads, dstate, generator=g, dtype=torch.float64) for _ in range(2))
    return x * dt[..., None], A * dt, B, C


@pytest.mark.parametrize("scan", SPELLINGS)
def test_ssd_spellings_agree(scan):
    X, A, B, C = ssd_inputs()
    initial = torch.randn(2, 1, 3, 4, 5, dtype=torch.float64)
    y, state = mamba2.SCANS[scan](X, A, B, C, 4, initial_states=initial)
    expected_y, expected_state = mamba2.ssd_recurrence(X, A, B, C, initial_states=initial)
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(state, expected_state)


def test_decode_step_is_one_step_of_the_recurrence():
    g = torch.Generator().manual_seed(1)
    state = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    x, dt = torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    A, D, bias = -torch.rand(4, generator=g, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    B, C = torch.randn(2, 2, 5, generator=g, dtype=torch.float64), torch.randn(2, 2, 5, generator=g, dtype=torch.float64)
    before = state.clone()
    y = mamba2.ssd_step(state, x, dt, A, B, C, D, bias)
    delta = F.softplus(dt + bias)
    per_head = [t.repeat_interleave(2, dim=1)[:, None] for t in (B, C)]
    expected, after = mamba2.ssd_recurrence((x * delta[..., None])[:, None], (delta * A)[:, None], *per_head,
                                            initial_states=before[:, None])
    torch.testing.assert_close(y, expected[:, 0] + D[:, None] * x)
    torch.testing.assert_close(state, after)


@pytest.mark.parametrize("scan", SPELLINGS)
def test_mixer_is_causal_and_spelling_independent(scan):
    torch.manual_seed(0)
    config = mamba2.Mamba2Config.tiny()
    reference = mamba2.Mamba2Mixer(config, "recurrent").double()
    mixer = mamba2.Mamba2Mixer(config, scan).double()
    mixer.load_state_dict(reference.state_dict())
    u = torch.randn(2, 16, config.d_model, dtype=torch.float64)
    torch.testing.assert_close(mixer(u), reference(u))
    changed = u.clone()
    changed[:, 9:] += 1.0
    torch.testing.assert_close(mixer(changed)[:, :9], mixer(u)[:, :9])

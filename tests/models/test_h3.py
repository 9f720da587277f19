"""The H3 reference model (models/h3.py): the dtypes of its FFT convolution, its two SSM kernels against
the recurrences they stand for, its size (shapes, causality and the convolution itself: test_lm.py)."""
from __future__ import annotations

import torch

from models.h3 import DiagonalSSMKernel, H3Config, H3LM, ShiftSSMKernel, fftconv_ref


def test_fftconv_ref_computes_in_the_filters_dtype_and_returns_the_inputs():
    u = torch.randn(2, 5, 37).bfloat16()
    k, D = torch.randn(5, 37), torch.randn(5)
    out = fftconv_ref(u, k, D)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fftconv_ref(u.float(), k, D).bfloat16())


def test_shift_kernel_is_its_taps_then_zeros():
    kernel = ShiftSSMKernel(d_model=3, d_state=8)
    long, short = kernel(20), kernel(5)
    assert long.shape == (3, 20) and short.shape == (3, 5)
    torch.testing.assert_close(long[:, :8], kernel.C.detach())
    assert (long[:, 8:] == 0).all()
    torch.testing.assert_close(short, kernel.C.detach()[:, :5])


def test_diagonal_kernel_is_the_impulse_response_of_its_recurrence():
    """x_t = exp(dtA) x_{t-1} + (exp(dtA) - 1) / A B u_t, y_t = 2 Re(C x_t): an impulse gives K."""
    torch.manual_seed(0)
    kernel = DiagonalSSMKernel(d_model=3, d_state=8, dt_min=1e-2, dt_max=1e-1)
    seqlen = 12
    with torch.no_grad():
        expected = kernel(seqlen)
        dtA = torch.complex(-torch.exp(kernel.log_A_real), kernel.A_imag) * torch.exp(kernel.log_dt)[:, None]
        A = dtA / torch.exp(kernel.log_dt)[:, None]
        B, C = torch.view_as_complex(kernel.B), torch.view_as_complex(kernel.C)
        state = (torch.exp(dtA) - 1) / A * B
        outputs = []
        for _ in range(seqlen):
            outputs.append(2 * (C * state).sum(-1).real)
            state = torch.exp(dtA) * state
    torch.testing.assert_close(expected, torch.stack(outputs, dim=-1), atol=1e-6, rtol=1e-5)


def test_h3_125m_config_has_about_125m_parameters():
    with torch.device("meta"):
        model = H3LM(H3Config.h3_125m())
    params = sum(p.numel() for p in model.parameters())
    assert 110e6 < params < 140e6

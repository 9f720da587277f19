"""H3 (Fu, Dao et al., 2023, "Hungry Hungry Hippos"): a language model built from SSM layers whose
convolution kernels are applied by FFT (the paper's FlashConv), written the way its code writes it.

An H3 layer on x (b, L, d), one channel per head (head_dim 1):

    q, k, v = W_q x, W_k x, W_v x                          (b, d, L) each
    k       = SSM_shift(k) = fftconv(k, K_shift, D_shift)   K_shift[t] = C_shift[t] for t < d_state, else 0
    y       = SSM_diag(k * v) = fftconv(k * v, K_diag, D)   multiplicative gating
    out     = W_o (q * y)

    fftconv(u, K, D) = irfft(rfft(u, n=2L) * rfft(K, n=2L), n=2L)[..., :L] + u * D

The shift SSM (A a shift matrix, B = e_1) has the learned C as its kernel. The diagonal SSM is
S4D's, with its kernel computed from the parameters on every call (zero-order hold, n = d_state / 2
complex modes in conjugate pairs):

    dtA_n   = exp(log_dt) * A_n,  A_n = -exp(log_A_real_n) + i A_imag_n
    K[t]    = 2 Re( sum_n C_n B_n (exp(dtA_n) - 1) / A_n * exp(dtA_n)^t )

The language model: embedding -> n_layer pre-norm blocks (x + H3(ln(x)), x + MLP(ln(x))) ->
final LayerNorm -> lm head tied to the embedding (models/lm.py, shared with the other model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from models import lm


def fftconv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (b, H, L) with the filter k (H, L) by FFT, plus the skip u * D (D (H,)).

    Computes in the filter's dtype (float32) and returns u's dtype.
    """
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size)
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size)[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


@dataclass(frozen=True)
class H3Config:
    vocab_size: int = 50304
    d_model: int = 768
    n_layer: int = 12
    d_state: int = 64
    mlp_ratio: int = 4
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    norm_eps: float = 1e-5

    @classmethod
    def tiny(cls, **overrides) -> H3Config:
        """For CPU tests: 32 channels, 2 layers, 8 states."""
        return replace(cls(vocab_size=64, d_model=32, n_layer=2, d_state=8), **overrides)

    @classmethod
    def h3_125m(cls, **overrides) -> H3Config:
        """The shapes of H3-125M (every layer H3; the paper's model puts attention in two of them)."""
        return replace(cls(), **overrides)


class ShiftSSMKernel(nn.Module):
    """The shift SSM's kernel: its learned C, d_state taps, zero beyond."""

    def __init__(self, d_model: int, d_state: int):
        super().__init__()
        self.C = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))

    def forward(self, seqlen: int) -> torch.Tensor:
        """(H, L) float32."""
        taps = self.C.float()[:, :seqlen]
        return F.pad(taps, (0, seqlen - taps.shape[1]))


class DiagonalSSMKernel(nn.Module):
    """S4D's diagonal SSM kernel, computed from its parameters for the requested length."""

    def __init__(self, d_model: int, d_state: int, dt_min: float, dt_max: float):
        super().__init__()
        modes = d_state // 2
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(d_model, modes)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(d_model, 1))
        self.B = nn.Parameter(torch.view_as_real(torch.ones(d_model, modes, dtype=torch.cfloat)))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(d_model, modes, dtype=torch.cfloat) * 0.5**0.5))

    def forward(self, seqlen: int) -> torch.Tensor:
        """(H, L) float32: K[t] = 2 Re(sum_n C_n B_n (exp(dtA_n) - 1) / A_n exp(dtA_n)^t)."""
        dt = torch.exp(self.log_dt.float())
        A = torch.complex(-torch.exp(self.log_A_real.float()), self.A_imag.float())
        dtA = A * dt.unsqueeze(-1)
        CB = torch.view_as_complex(self.C.float()) * torch.view_as_complex(self.B.float())
        CB = CB * (torch.exp(dtA) - 1.0) / A
        powers = torch.exp(dtA.unsqueeze(-1) * torch.arange(seqlen, device=dtA.device))
        return 2 * torch.einsum("hn,hnl->hl", CB, powers).real


class H3(nn.Module):
    """The H3 mixer: (b, L, d_model) -> (b, L, d_model)."""

    def __init__(self, config: H3Config):
        super().__init__()
        d = config.d_model
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.shift_kernel = ShiftSSMKernel(d, config.d_state)
        self.diag_kernel = DiagonalSSMKernel(d, config.d_state, config.dt_min, config.dt_max)
        self.D_shift = nn.Parameter(torch.randn(d))
        self.D = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seqlen = x.shape[1]
        q = self.q_proj(x).transpose(1, 2)
        k = self.k_proj(x).transpose(1, 2)
        v = self.v_proj(x).transpose(1, 2)
        k = fftconv_ref(k, self.shift_kernel(seqlen), self.D_shift)
        y = fftconv_ref(k * v, self.diag_kernel(seqlen), self.D)
        return self.out_proj((q * y).transpose(1, 2))


class H3LM(lm.SequenceLM):
    """Token ids (b, L) -> logits (b, L, vocab_size), every block mixing with H3."""

    def __init__(self, config: H3Config):
        super().__init__(config, H3)


def example(config: H3Config, batch: int = 2, length: int = 64, seed: int = 0):
    """(model in eval mode, example args) for the CLI and the demo."""
    return lm.example(lambda: H3LM(config), batch, length, seed)


def tiny():
    return example(H3Config.tiny())


def h3_125m(batch: int = 8, length: int = 2048):
    return example(H3Config.h3_125m(), batch=batch, length=length)

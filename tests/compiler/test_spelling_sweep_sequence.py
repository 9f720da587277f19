"""A generality sweep of the sequence families against spellings taken from other people's code:
FlashFFTConv's and S4D's standalone FFT convolutions, safari's Hyena operator, causal-conv1d's
reference, flash-linear-attention's ShortConvolution, mamba-minimal's block, scans discretised
inside the loop, tommyip's mamba2-minimal (chunked, quadratic, decode step) and mamba_ssm's
unstable segsum.

Each case builds a tiny module in its source's style, compiles it, asserts the family fused as often
as expected and that the outputs obey the tolerance rule against fp64 eager, on two fresh inputs
(the second call reuses the compiled graph). Sizes are tiny: kernels run on Triton's interpreter.

The forms no rule fuses yet (the parallel forms of mamba-tiny, heinsen_sequence and mamba.py's
in-place pscan, mamba_ssm's ssd_chunk_scan_combined_ref, a channel-mixing spectral conv, a short
conv from a carried state) run as eager does, and report() names the node where each stopped.
mamba_ssm's conv decode step (a rolled cache written in place) is not fused; its cache stays exact.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange, repeat

import compiler
from tests.compiler.equivalence import cast_inputs
from tests.numerics import assert_close_by_rule

fp32, bf16 = torch.float32, torch.bfloat16


# -- long convolutions -------------------------------------------------------------------------
def next_power_of_2(n: int) -> int:
    return 2 ** math.ceil(math.log2(n))


def decaying(channels: int, taps: int) -> torch.Tensor:
    return torch.randn(channels, taps) * torch.exp(-torch.arange(taps) / (0.2 * taps))


def flashfftconv_ref(u, k, N):
    """FlashFFTConv's reference: complex fft of both to N, ifft, .real, cut to L."""
    L = u.shape[-1]
    u_f = torch.fft.fft(u.float(), n=N)
    k_f = torch.fft.fft(k.float(), n=N)
    y = torch.fft.ifft(u_f * k_f, n=N).real[..., :L].to(u.dtype).contiguous()
    return y


class FlashFFTConvRef(nn.Module):
    """FlashFFTConv's benchmark module: an (H, L) filter, N the next power of two of 2L."""

    def __init__(self, d_model, seqlen):
        super().__init__()
        self.k = nn.Parameter(decaying(d_model, seqlen))

    def forward(self, u):
        return flashfftconv_ref(u, self.k, next_power_of_2(2 * u.shape[-1]))


class ForwardNormConv(nn.Module):
    """rfft(..., norm="forward") on the filter, irfft(..., norm="forward") back: the 1/n once."""

    def __init__(self, d_model, seqlen):
        super().__init__()
        self.k = nn.Parameter(decaying(d_model, seqlen))
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, u):
        n = next_power_of_2(2 * u.shape[-1])
        k_f = torch.fft.rfft(self.k, n=n, norm="forward")
        u_f = torch.fft.rfft(u, n=n)
        y = torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., : u.shape[-1]]
        return y + self.D[:, None] * u


class RfftnConv(nn.Module):
    """torch.fft.rfftn / irfftn over the last dim, s=(2L,), a (1, H, L) filter, bf16 input upcast."""

    def __init__(self, d_model, seqlen):
        super().__init__()
        self.k = nn.Parameter(decaying(d_model, seqlen)[None])

    def forward(self, u):
        L = u.shape[-1]
        u_f = torch.fft.rfftn(u.float(), s=(2 * L,), dim=(-1,))
        k_f = torch.fft.rfftn(self.k, s=(2 * L,), dim=(-1,))
        return torch.fft.irfftn(u_f * k_f, s=(2 * L,), dim=(-1,))[..., :L].type_as(u)


class CatZerosConv(nn.Module):
    """Zero padding to 2L spelled as a concatenation, the transforms without n, irfft's default n."""

    def __init__(self, d_model, seqlen):
        super().__init__()
        self.k = nn.Parameter(decaying(d_model, seqlen))
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, u):
        u_f = torch.fft.rfft(torch.cat([u, torch.zeros_like(u)], dim=-1))
        k_f = torch.fft.rfft(torch.cat([self.k, torch.zeros_like(self.k)], dim=-1))
        return torch.fft.irfft(u_f * k_f)[..., : u.shape[-1]] + u * self.D.unsqueeze(-1)


class SquashedLongConv(nn.Module):
    """Fu et al.'s simple long convolutions: the (H, L) kernel soft-thresholded on every call."""

    def __init__(self, d_model, seqlen, lam=0.003):
        super().__init__()
        self.k = nn.Parameter(decaying(d_model, seqlen))
        self.D = nn.Parameter(torch.randn(d_model))
        self.lam = lam

    def forward(self, u):
        L = u.size(-1)
        k = F.relu(torch.abs(self.k) - self.lam) * torch.sign(self.k)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return y + u * self.D.unsqueeze(-1)


class S4D(nn.Module):
    """state-spaces/s4's standalone example (models/s4/s4d.py): the Vandermonde kernel, an FFT
    convolution with a D skip, GELU, then a 1x1 Conv1d and GLU (which is no short convolution)."""

    def __init__(self, d_model, d_state=8, dt_min=0.001, dt_max=0.1):
        super().__init__()
        H, N = d_model, d_state
        self.h = d_model
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, N // 2, dtype=torch.cfloat)))
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(H, N // 2)))
        self.A_imag = nn.Parameter(math.pi * repeat(torch.arange(N // 2).float(), "n -> h n", h=H))
        self.D = nn.Parameter(torch.randn(H))
        self.activation = nn.GELU()
        self.output_linear = nn.Sequential(nn.Conv1d(H, 2 * H, kernel_size=1), nn.GLU(dim=-2))

    def kernel(self, L):
        dt = torch.exp(self.log_dt)
        C = torch.view_as_complex(self.C)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag
        dtA = A * dt.unsqueeze(-1)
        K = dtA.unsqueeze(-1) * torch.arange(L, device=A.device)
        C = C * (torch.exp(dtA) - 1.0) / A
        return 2 * torch.einsum("hn, hnl -> hl", C, torch.exp(K)).real

    def forward(self, u):
        L = u.size(-1)
        k = self.kernel(L=L)
        k_f = torch.fft.rfft(k, n=2 * L)
        u_f = torch.fft.rfft(u, n=2 * L)
        y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]
        y = y + u * self.D.unsqueeze(-1)
        return self.output_linear(self.activation(y))


class HyenaOperator(nn.Module):
    """safari's HyenaOperator (order 2): in_proj, a short depthwise Conv1d cut to L, the gates, an
    implicit filter from an MLP over positional features with exponential decay, fftconv, out_proj."""

    def __init__(self, d_model, l_max, filter_order=8):
        super().__init__()
        self.d_model, self.l_max = d_model, l_max
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv1d(3 * d_model, 3 * d_model, 3, padding=2, groups=3 * d_model)
        t = torch.linspace(0, 1, l_max)[None, :, None]
        freqs = torch.linspace(1e-4, 1, 2)[None, None]
        z = torch.exp(-1j * 2 * math.pi * freqs * torch.arange(l_max)[None, :, None] / l_max)
        self.register_buffer("z", torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)
        self.implicit_filter = nn.Sequential(nn.Linear(5, filter_order), nn.SiLU(),
                                             nn.Linear(filter_order, d_model, bias=False))
        self.register_buffer("deltas", torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d_model)[None, None])
        self.bias = nn.Parameter(torch.randn(d_model))

    def filter(self, L):
        h = self.implicit_filter(self.z[:, :L])
        return h * torch.exp(-self.t[:, :L] * self.deltas.abs())

    def forward(self, u):
        L = u.size(-2)
        u = self.in_proj(u).transpose(1, 2)
        uc = self.short_filter(u)[..., :L]
        x0, x1, v = uc.split(self.d_model, dim=1)
        k = rearrange(self.filter(L)[0], "l d -> d l")
        v = v * x1
        fft_size = 2 * L
        k_f = torch.fft.rfft(k, n=fft_size) / fft_size
        v_f = torch.fft.rfft(v, n=fft_size)
        y = torch.fft.irfft(v_f * k_f, n=fft_size, norm="forward")[..., :L]
        y = (y + v * self.bias.unsqueeze(-1)) * x0
        return self.out_proj(y.transpose(1, 2))


# -- short convolutions ------------------------------------------------------------------------
def causal_conv1d_ref(x, weight, bias=None, initial_states=None, activation=None):
    """Dao-AILab/causal-conv1d's reference: weight (dim, width), unsqueezed for F.conv1d."""
    dtype_in = x.dtype
    x = x.to(weight.dtype)
    seqlen = x.shape[-1]
    dim, width = weight.shape
    if initial_states is None:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)
    else:
        x = torch.cat([initial_states, x], dim=-1)
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=0, groups=dim)
    out = out[..., :seqlen]
    return (out if activation is None else F.silu(out)).to(dtype=dtype_in)


class CausalConv1dRef(nn.Module):
    def __init__(self, dim, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, width) / width)
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return causal_conv1d_ref(x, self.weight, self.bias, activation="silu")


class ConvWeightThroughF(nn.Module):
    """A layer's Conv1d whose weight and bias are used through F.conv1d with its own padding."""

    def __init__(self, dim, width):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, width, padding=width - 1, groups=dim)

    def forward(self, x):
        L = x.shape[1]
        x = x.transpose(1, 2)
        y = F.conv1d(x, self.conv.weight, self.conv.bias, padding=self.conv.padding, groups=self.conv.groups)
        return F.silu(y[:, :, :L]).transpose(1, 2)


class PaddedLayerConv(nn.Module):
    """F.pad(x, (k-1, 0)) in front of an unpadded nn.Conv1d layer, then nn.SiLU."""

    def __init__(self, dim, width):
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(dim, dim, width, groups=dim)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(F.pad(x, (self.width - 1, 0))))


class HFMamba2Conv(nn.Module):
    """Hugging Face Mamba2's torch path: act(conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2))."""

    def __init__(self, dim, width):
        super().__init__()
        self.conv1d = nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv1d(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))


class NegativeSliceConv(nn.Module):
    """padding=(K-1,) as a tuple, no bias, the tail cut off with [:, :, :-(K-1)]."""

    def __init__(self, dim, width):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, width, groups=dim, padding=(width - 1,), bias=False)
        self.cut = width - 1

    def forward(self, x):
        return F.silu(self.conv(x)[:, :, :-self.cut])


class ShortConvolution(nn.Conv1d):
    """flash-linear-attention's ShortConvolution on its torch path: an nn.Conv1d subclass calling
    _conv_forward on (B, T, D) rearranged."""

    def __init__(self, hidden_size, kernel_size):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1,
                         bias=False)

    def forward(self, x):
        x = rearrange(x, "b t d -> b d t")
        x = self._conv_forward(x, self.weight, self.bias)[..., : x.shape[-1]]
        return rearrange(F.silu(x), "b d t -> b t d")


class TransposedBackConv(nn.Module):
    """tommyip/mamba2-minimal: silu(conv1d(xBC.transpose(1, 2)).transpose(1, 2)[:, :seqlen, :]), the cut
    after the transpose back."""

    def __init__(self, dim, width):
        super().__init__()
        self.conv1d = nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1)

    def forward(self, xBC):
        return F.silu(self.conv1d(xBC.transpose(1, 2)).transpose(1, 2)[:, : xBC.shape[1], :])


class UpcastConv(nn.Module):
    """bf16 activations through an fp32 conv (x.to(weight.dtype)), cast back after the SiLU."""

    def __init__(self, dim, width):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1)

    def forward(self, x):
        y = self.conv(x.to(self.conv.weight.dtype))[..., : x.shape[-1]]
        return F.silu(y).to(x.dtype)


class ConvStep(nn.Module):
    """mamba_ssm's Mamba.step without causal_conv1d_update: the cached window rolled and written in
    place, then read out against the conv's weight (no fused op: the cache must stay exact)."""

    def __init__(self, dim, width, batch=2):
        super().__init__()
        self.conv1d = nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1)
        self.register_buffer("conv_state", torch.randn(batch, dim, width))

    def forward(self, x):
        self.conv_state.copy_(torch.roll(self.conv_state, shifts=-1, dims=-1))
        self.conv_state[:, :, -1] = x
        x = torch.sum(self.conv_state * rearrange(self.conv1d.weight, "d 1 w -> d w"), dim=-1)
        return F.silu(x + self.conv1d.bias)


# -- selective scan ----------------------------------------------------------------------------
class MambaMinimalBlock(nn.Module):
    """johnma2006/mamba-minimal's MambaBlock: einops einsum discretisation, a Python loop, stack."""

    def __init__(self, d_model, d_state=4, expand=2, d_conv=4, dt_rank=2):
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank, self.d_state = dt_rank, d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(repeat(torch.arange(1, d_state + 1).float(), "n -> d n", d=d_inner)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x):
        (b, l, d) = x.shape
        x_and_res = self.in_proj(x)
        (x, res) = x_and_res.split(split_size=[x_and_res.shape[-1] // 2] * 2, dim=-1)
        x = rearrange(x, "b l d_in -> b d_in l")
        x = self.conv1d(x)[:, :, :l]
        x = rearrange(x, "b d_in l -> b l d_in")
        x = F.silu(x)
        y = self.ssm(x)
        y = y * F.silu(res)
        return self.out_proj(y)

    def ssm(self, x):
        A = -torch.exp(self.A_log.float())
        D = self.D.float()
        x_dbl = self.x_proj(x)
        (delta, B, C) = x_dbl.split(split_size=[self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(delta))
        return self.selective_scan(x, delta, A, B, C, D)

    def selective_scan(self, u, delta, A, B, C, D):
        (b, l, d_in) = u.shape
        n = A.shape[1]
        deltaA = torch.exp(einsum(delta, A, "b l d_in, d_in n -> b l d_in n"))
        deltaB_u = einsum(delta, B, u, "b l d_in, b l n, b l d_in -> b l d_in n")
        x = torch.zeros((b, d_in, n), device=deltaA.device)
        ys = []
        for i in range(l):
            x = deltaA[:, i] * x + deltaB_u[:, i]
            y = einsum(x, C[:, i, :], "b d_in n, b n -> b d_in")
            ys.append(y)
        y = torch.stack(ys, dim=1)
        return y + u * D


class FoldedSoftplusScan(nn.Module):
    """A scan taking raw dt: softplus(dt + bias) in the module, B and C time-major, torch.einsum."""

    def __init__(self, d_inner, d_state):
        super().__init__()
        self.A_log = nn.Parameter(torch.log(torch.rand(d_inner, d_state) + 0.5))
        self.dt_bias = nn.Parameter(torch.rand(d_inner) - 4)
        self.D = nn.Parameter(torch.randn(d_inner))

    def forward(self, u, dt, B, C, z):
        A = -torch.exp(self.A_log)
        delta = F.softplus(dt + self.dt_bias)
        dA = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d, n)
        dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
        h = torch.zeros_like(dA[:, 0])
        ys = []
        for t in range(u.shape[1]):
            h = dA[:, t] * h + dBu[:, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        y = torch.stack(ys, dim=1) + u * self.D
        return y * F.silu(z)


class StepDiscretisedScan(nn.Module):
    """The discretisation inside the loop: exp(Δ_t ⊗ A) and Δ_t u_t ⊗ B_t per step, mul + sum readout;
    Δ_t[..., None] taken once and read by both (`shared`), or u_t under an exp (no selective scan)."""

    def __init__(self, form="plain"):
        super().__init__()
        self.form = form

    def forward(self, u, delta, A, B, C, D):
        h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
        ys = []
        for i in range(u.shape[1]):
            d = delta[:, i].unsqueeze(-1)
            dA = torch.exp(d * A)
            if self.form == "shared":
                h = dA * h + d * u[:, i].unsqueeze(-1) * B[:, i].unsqueeze(1)
            else:
                u_i = torch.exp(u[:, i]) if self.form == "exp" else u[:, i]
                h = dA * h + (delta[:, i] * u_i).unsqueeze(-1) * B[:, i].unsqueeze(1)
            ys.append((h * C[:, i].unsqueeze(1)).sum(-1))
        return torch.stack(ys, 1) + u * D


class MambaTinyScan(nn.Module):
    """PeaBrane/mamba-tiny's selective_scan: the recurrence as cumsums of a flipped decay."""

    def forward(self, u, delta, A, B, C, D):
        dA = einsum(delta, A, "b l d, d n -> b l d n")
        dB_u = einsum(delta, B, u, "b l d, b l n, b l d -> b l d n")
        dA_cumsum = F.pad(dA[:, 1:], (0, 0, 0, 0, 0, 1)).flip(1).cumsum(1).exp().flip(1)
        x = (dB_u * dA_cumsum).cumsum(1) / (dA_cumsum + 1e-12)
        return einsum(x, C, "b l d n, b l n -> b l d") + u * D


class HeinsenScan(nn.Module):
    """heinsen_sequence's log-space form: log h = a* + logcumsumexp(log b - a*), a* = cumsum(log a)."""

    def forward(self, u, delta, A, B, C, D):
        log_a = delta.unsqueeze(-1) * A
        a_star = torch.cumsum(log_a, dim=1)
        log_b = torch.log((delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)).to(torch.complex64))
        h = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=1)).real
        return (h * C.unsqueeze(2)).sum(-1) + u * D


def scan_inputs(batch=2, seqlen=6, dim=4, dstate=3):
    return [torch.randn(batch, seqlen, dim), F.softplus(torch.randn(batch, seqlen, dim)),
            -torch.rand(dim, dstate) - 0.5, torch.randn(batch, seqlen, dstate), torch.randn(batch, seqlen, dstate),
            torch.randn(dim)]


class ChannelMixingSpectralConv(nn.Module):
    """CKConv's fftconv: every output channel from every input channel, not a depthwise long conv."""

    def __init__(self, channels, seqlen):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, seqlen) * 0.1)

    def forward(self, x):
        n = 2 * x.shape[-1]
        out_f = torch.einsum("bi...,oi...->bo...", torch.fft.rfft(x, n=n), torch.fft.rfft(self.weight, n=n))
        return torch.fft.irfft(out_f, n=n)[..., : x.shape[-1]]


class CarriedStateConv(CausalConv1dRef):
    """causal_conv1d_ref with initial_states: the previous K-1 inputs in front, an unpadded conv."""

    def forward(self, x, initial_states):
        return causal_conv1d_ref(x, self.weight, self.bias, initial_states, activation="silu")


def npo2(n): return 2 ** math.ceil(math.log2(n))
def pad_npo2(X):
    return F.pad(X, (0, 0, 0, 0, 0, npo2(X.size(1)) - X.size(1)), "constant", 0)

class PScan(torch.autograd.Function):
    """alxndrTL/mamba.py's Blelloch scan, in place on views of clones (forward only)."""

    @staticmethod
    def pscan(A, X):
        B, D, L, _ = A.size()
        num_steps = int(math.log2(L))
        Aa = A
        Xa = X
        for _ in range(num_steps - 2):
            T = Xa.size(2)
            Aa = Aa.view(B, D, T // 2, 2, -1)
            Xa = Xa.view(B, D, T // 2, 2, -1)
            Xa[:, :, :, 1].add_(Aa[:, :, :, 1].mul(Xa[:, :, :, 0]))
            Aa[:, :, :, 1].mul_(Aa[:, :, :, 0])
            Aa = Aa[:, :, :, 1]
            Xa = Xa[:, :, :, 1]
        if Xa.size(2) == 4:
            Xa[:, :, 1].add_(Aa[:, :, 1].mul(Xa[:, :, 0]))
            Aa[:, :, 1].mul_(Aa[:, :, 0])
            Xa[:, :, 3].add_(Aa[:, :, 3].mul(Xa[:, :, 2] + Aa[:, :, 2].mul(Xa[:, :, 1])))
        elif Xa.size(2) == 2:
            Xa[:, :, 1].add_(Aa[:, :, 1].mul(Xa[:, :, 0]))
            return
        else:
            return
        Aa = A[:, :, 2 ** (num_steps - 2) - 1:L:2 ** (num_steps - 2)]
        Xa = X[:, :, 2 ** (num_steps - 2) - 1:L:2 ** (num_steps - 2)]
        Xa[:, :, 2].add_(Aa[:, :, 2].mul(Xa[:, :, 1]))
        Aa[:, :, 2].mul_(Aa[:, :, 1])
        for k in range(num_steps - 3, -1, -1):
            Aa = A[:, :, 2 ** k - 1:L:2 ** k]
            Xa = X[:, :, 2 ** k - 1:L:2 ** k]
            T = Xa.size(2)
            Aa = Aa.view(B, D, T // 2, 2, -1)
            Xa = Xa.view(B, D, T // 2, 2, -1)
            Xa[:, :, 1:, 0].add_(Aa[:, :, 1:, 0].mul(Xa[:, :, :-1, 1]))
            Aa[:, :, 1:, 0].mul_(Aa[:, :, :-1, 1])

    @staticmethod
    def forward(ctx, A_in, X_in):
        L = X_in.size(1)
        if L == npo2(L):
            A, X = A_in.clone(), X_in.clone()
        else:
            A, X = pad_npo2(A_in), pad_npo2(X_in)
        A, X = A.transpose(2, 1), X.transpose(2, 1)
        PScan.pscan(A, X)
        return X.transpose(2, 1)[:, :L]

class MambaPyPScan(nn.Module):
    """mamba.py's selective_scan: time-major (b, L, d), the states from PScan, a matmul readout."""

    def forward(self, x, delta, A, B, C, D):
        deltaA = torch.exp(delta.unsqueeze(-1) * A)
        BX = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
        hs = PScan.apply(deltaA, BX)
        y = (hs @ C.unsqueeze(-1)).squeeze(3)
        return y + D * x


# -- SSD (Mamba-2) -----------------------------------------------------------------------------
def segsum_repeat(x):
    """tommyip/mamba2-minimal's segsum: einops repeat, a tril mask, cumsum, masked_fill -inf."""
    T = x.size(-1)
    x = repeat(x, "... d -> ... d e", e=T)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def segsum_unstable(x):
    """mamba_ssm's segsum_unstable: differences of one cumsum, masked with -inf."""
    T = x.size(-1)
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def ssd(x, A, B, C, chunk_size, initial_states=None, segsum=segsum_repeat):
    """tommyip/mamba2-minimal's ssd (einops rearranges, spaces inside the einsum strings)."""
    x, A, B, C = [rearrange(m, "b (c l) ... -> b c l ...", l=chunk_size) for m in (x, A, B, C)]
    A = rearrange(A, "b c l h -> b h c l")
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn, bcshn, bhcls, bcshp -> bclhp", C, B, L, x)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn, bhcl, bclhp -> bchpn", B, decay_states, x)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc, bchpn -> bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn, bchpn, bhcl -> bclhp", C, states, state_decay_out)
    Y = rearrange(Y_diag + Y_off, "b c l h p -> b (c l) h p")
    return Y, final_state


def ssd_quadratic(x, A, B, C, chunk_size=None, initial_states=None, segsum=segsum_repeat):
    """The SSD as masked attention over the whole sequence (no chunks, no state returned)."""
    L = torch.exp(segsum(rearrange(A, "b l h -> b h l")))
    return torch.einsum("blhn, bshn, bhls, bshp -> blhp", C, B, L, x), None


class Mamba2Minimal(nn.Module):
    """tommyip/mamba2-minimal's Mamba2 core from the conv output on: B and C per group of heads
    (`b l 1 n` broadcast in the einsums when there is one group, repeated to heads otherwise),
    dt softplus with bias, D skip, a gated RMS norm; L padded to whole chunks when `pad`."""

    def __init__(self, heads=4, headdim=4, d_state=4, groups=1, chunk=4, pad=False, initial=False,
                 segsum=segsum_repeat, scan=ssd):
        super().__init__()
        self.heads, self.headdim, self.d_state, self.groups, self.chunk = heads, headdim, d_state, groups, chunk
        self.pad, self.segsum, self.scan = pad, segsum, scan
        self.A_log = nn.Parameter(torch.log(torch.rand(heads) * 3 + 1))
        self.dt_bias = nn.Parameter(torch.rand(heads) - 3)
        self.D = nn.Parameter(torch.randn(heads))
        self.norm_weight = nn.Parameter(torch.randn(heads * headdim))
        self.initial = nn.Parameter(torch.randn(1, 1, heads, headdim, d_state)) if initial else None

    def forward(self, xBC, dt, z):
        x, B, C = torch.split(xBC, [self.heads * self.headdim, self.groups * self.d_state,
                                    self.groups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log)
        dt = F.softplus(dt + self.dt_bias)
        x = rearrange(x, "b l (h p) -> b l h p", p=self.headdim)
        B = rearrange(B, "b l (g n) -> b l g n", g=self.groups)
        C = rearrange(C, "b l (g n) -> b l g n", g=self.groups)
        if self.groups > 1:
            B, C = (repeat(t, "b l g n -> b l (g r) n", r=self.heads // self.groups) for t in (B, C))
        seqlen = x.shape[1]
        X, dA = x * dt.unsqueeze(-1), A * dt
        if self.pad:
            extra = (-seqlen) % self.chunk
            X, dA, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, extra)) for t in (X, dA, B, C))
        initial = None if self.initial is None else self.initial.expand(x.shape[0], -1, -1, -1, -1)
        y, state = self.scan(X, dA, B, C, self.chunk, initial, self.segsum)
        y = y[:, :seqlen] + x * self.D.unsqueeze(-1)
        y = rearrange(y, "b l h p -> b l (h p)")
        y = y * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight
        return y if state is None else (y, state)


def chunk_state_ref(B, x, dt, dA_cumsum):
    """mamba_ssm/ops/triton/ssd_chunk_state.py's reference."""
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    _, _, nchunks, chunk_size = dt.shape
    ngroups = B.shape[2]
    if seqlen < nchunks * chunk_size:
        x = F.pad(x, (0, 0, 0, 0, 0, nchunks * chunk_size - seqlen))
        B = F.pad(B, (0, 0, 0, 0, 0, nchunks * chunk_size - seqlen))
    x = rearrange(x, "b (c l) h p -> b c l h p", l=chunk_size)
    B = rearrange(B, "b (c l) ... -> b c l ...", l=chunk_size)
    B = repeat(B, "b c l g d -> b c l (g h) d", h=nheads // ngroups)
    decay_states = torch.exp((dA_cumsum[:, :, :, -1:] - dA_cumsum))
    return torch.einsum("bclhn,bhcl,bhcl,bclhp->bchpn", B.to(x.dtype), decay_states.to(x.dtype), dt.to(x.dtype), x)

def state_passing_ref(states, dA_chunk_cumsum, initial_states=None):
    """mamba_ssm/ops/triton/ssd_state_passing.py's reference: the mask applied after exp."""
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, 0])
    states = torch.cat([rearrange(initial_states, "b h d -> b 1 h d"), states], dim=1)
    dA_chunk_cumsum = F.pad(dA_chunk_cumsum, (1, 0))
    dA_chunk_cumsum = torch.cumsum(dA_chunk_cumsum, dim=-1)
    nchunks = dA_chunk_cumsum.shape[-1]
    dt_chunk_segment_sum = dA_chunk_cumsum[:, :, :, None] - dA_chunk_cumsum[:, :, None, :]
    decay_chunk = torch.exp(dt_chunk_segment_sum)
    causal_mask = torch.tril(torch.ones(nchunks, nchunks, device=states.device, dtype=bool), diagonal=0)
    decay_chunk = decay_chunk.masked_fill(~causal_mask, 0)
    out = torch.einsum("bhzc,bchd->bzhd", decay_chunk.to(dtype=states.dtype), states)
    return out[:, :-1], out[:, -1]

def chunk_scan_ref(B, C, x, dt, dA_cumsum, prev_states, D=None, z=None):
    """mamba_ssm/ops/triton/ssd_chunk_scan.py's reference: Δ a factor of its own, the mask on C B^T * decay."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    _, _, nchunks, chunk_size = dt.shape
    B = repeat(B, "b l g d -> b l (g h) d", h=nheads // ngroups)
    C = repeat(C, "b l g d -> b l (g h) d", h=nheads // ngroups)
    CB = torch.einsum("bclhn,bcshn->bchls", rearrange(C, "b (c l) h n -> b c l h n", c=nchunks),
                      rearrange(B, "b (c s) h n -> b c s h n", c=nchunks))
    dt_segment_sum = dA_cumsum[:, :, :, :, None] - dA_cumsum[:, :, :, None, :]
    decay = torch.exp(dt_segment_sum)
    scores_decay = CB * rearrange(decay, "b h c l s -> b c h l s")
    causal_mask = torch.tril(torch.ones(chunk_size, chunk_size, device=x.device, dtype=bool), diagonal=0)
    scores_decay = scores_decay.masked_fill(~causal_mask, 0)
    out = torch.einsum('bchls,bhcs,bcshp->bclhp', scores_decay.to(x.dtype), dt.to(x.dtype),
                       rearrange(x, "b (c s) h p -> b c s h p", c=nchunks))
    state_decay_out = torch.exp(rearrange(dA_cumsum, "b h c l -> b c l h 1"))
    out_prev = torch.einsum('bclhn,bchpn->bclhp', rearrange(C, "b (c l) h n -> b c l h n", c=nchunks),
                            prev_states.to(C.dtype)) * state_decay_out
    out = out + out_prev
    out = rearrange(out, "b c l h p -> b (c l) h p")
    if D is not None:
        if D.dim() == 1:
            D = rearrange(D, "h -> h 1")
        out = out + x * D
    return out if z is None else out * F.silu(z)

def ssd_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm/ops/triton/ssd_combined.py's reference of the fused SSD kernels."""
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    if seqlen % chunk_size != 0:
        dt = F.pad(dt, (0, 0, 0, chunk_size - seqlen % chunk_size))
    dt = rearrange(dt, "b (c l) h -> b h c l", l=chunk_size)
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + rearrange(dt_bias, "h -> h 1 1")
    if dt_softplus:
        dt = F.softplus(dt)
    dA = dt * rearrange(A, "h -> h 1 1")
    dA_cumsum = torch.cumsum(dA, dim=-1)
    states = chunk_state_ref(B, x, dt, dA_cumsum)
    states_dtype = states.dtype
    if states.dtype not in [torch.float32, torch.float64]:
        states = states.to(torch.float32)
    states = rearrange(state_passing_ref(rearrange(states, "... p n -> ... (p n)"), dA_cumsum[:, :, :, -1])[0],
                       "... (p n) -> ... p n", n=dstate)
    states = states.to(states_dtype)
    out = chunk_scan_ref(B, C, x, dt, dA_cumsum, states, D=D, z=z)
    return out

class CombinedRef(nn.Module):
    def __init__(self, heads=4):
        super().__init__()
        self.A, self.D = nn.Parameter(-torch.rand(heads) - 0.5), nn.Parameter(torch.randn(heads))
        self.dt_bias = nn.Parameter(torch.rand(heads) - 3)

    def forward(self, x, dt, B, C, z):
        return ssd_chunk_scan_combined_ref(x, dt, self.A, B, C, 4, D=self.D, z=z, dt_bias=self.dt_bias,
                                           dt_softplus=True)


class Mamba2MinimalStep(nn.Module):
    """tommyip/mamba2-minimal's Mamba2.step: one token, a 3-operand einsum for Δ B x, the cached state
    updated with copy_ and read back (the second call continues from the first's state)."""

    def __init__(self, batch=2, heads=4, headdim=4, d_state=4):
        super().__init__()
        self.register_buffer("ssm_state", torch.randn(batch, heads, headdim, d_state))
        self.A_log = nn.Parameter(torch.log(torch.rand(heads) * 3 + 1))
        self.D = nn.Parameter(torch.randn(heads))
        self.dt_bias = nn.Parameter(torch.rand(heads) - 3)
        self.headdim = headdim

    def forward(self, x, dt, B, C):
        A = -torch.exp(self.A_log)
        dt = F.softplus(dt + self.dt_bias)
        dA = torch.exp(dt * A)
        x = rearrange(x, "b (h p) -> b h p", p=self.headdim)
        dBx = torch.einsum("bh, bn, bhp -> bhpn", dt, B, x)
        self.ssm_state.copy_(self.ssm_state * rearrange(dA, "b h -> b h 1 1") + dBx)
        y = torch.einsum("bhpn, bn -> bhp", self.ssm_state, C)
        y = y + rearrange(self.D, "h -> h 1") * x
        return rearrange(y, "b h p -> b (h p)")


def mamba2_inputs(batch=2, seqlen=8, heads=4, headdim=4, d_state=4, groups=1):
    width = heads * headdim + 2 * groups * d_state
    return [torch.randn(batch, seqlen, width), torch.randn(batch, seqlen, heads),
            torch.randn(batch, seqlen, heads * headdim)]


# -- the sweep ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], list]
    fused: dict
    dtype: torch.dtype = fp32
    cast_module: bool = False  # run the module in dtype too (else fp32 parameters, dtype inputs)


CASES = [
    Case("flashfftconv-ref-pow2", lambda: FlashFFTConvRef(4, 24), lambda: [torch.randn(2, 4, 24)], {"long_conv": 1}),
    Case("flashfftconv-ref-bf16", lambda: FlashFFTConvRef(4, 24), lambda: [torch.randn(2, 4, 24)],
         {"long_conv": 1}, bf16),
    Case("rfft-norm-forward-pow2", lambda: ForwardNormConv(3, 20), lambda: [torch.randn(2, 3, 20)], {"long_conv": 1}),
    Case("cat-zeros-default-n", lambda: CatZerosConv(3, 20), lambda: [torch.randn(2, 3, 20)], {"long_conv": 1}),
    Case("squashed-kernel", lambda: SquashedLongConv(3, 20), lambda: [torch.randn(2, 3, 20)], {"long_conv": 1}),
    Case("rfftn-irfftn-bf16", lambda: RfftnConv(3, 20), lambda: [torch.randn(2, 3, 20)], {"long_conv": 1}, bf16),
    Case("s4d-standalone", lambda: S4D(4), lambda: [torch.randn(2, 4, 30)], {"long_conv": 1}),
    Case("hyena-operator", lambda: HyenaOperator(4, 32), lambda: [torch.randn(2, 32, 4)],
         {"long_conv": 1, "short_conv": 1}),
    Case("causal-conv1d-ref", lambda: CausalConv1dRef(6, 4), lambda: [torch.randn(2, 6, 20)], {"short_conv": 1}),
    Case("conv-weight-through-F", lambda: ConvWeightThroughF(6, 3), lambda: [torch.randn(2, 20, 6)],
         {"short_conv": 1}),
    Case("pad-then-conv-layer", lambda: PaddedLayerConv(6, 4), lambda: [torch.randn(2, 6, 20)], {"short_conv": 1}),
    Case("hf-mamba2-conv", lambda: HFMamba2Conv(6, 4), lambda: [torch.randn(2, 20, 6)], {"short_conv": 1}),
    Case("negative-slice-no-bias", lambda: NegativeSliceConv(6, 4), lambda: [torch.randn(2, 6, 20)],
         {"short_conv": 1}),
    Case("fla-short-convolution", lambda: ShortConvolution(6, 4), lambda: [torch.randn(2, 20, 6)], {"short_conv": 1}),
    Case("cut-after-transpose-back", lambda: TransposedBackConv(6, 4), lambda: [torch.randn(2, 20, 6)],
         {"short_conv": 1}),
    Case("upcast-conv-bf16", lambda: UpcastConv(6, 4), lambda: [torch.randn(2, 6, 20)], {"short_conv": 1}, bf16),
    Case("mamba-minimal-block", lambda: MambaMinimalBlock(4), lambda: [torch.randn(2, 6, 4)],
         {"short_conv": 1, "ssm_scan": 1}),
    Case("folded-softplus-scan", lambda: FoldedSoftplusScan(4, 3),
         lambda: [torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(2, 6, 3), torch.randn(2, 6, 3),
                  torch.randn(2, 6, 4)], {"ssm_scan": 1}),
    Case("scan-discretised-per-step", lambda: StepDiscretisedScan(), scan_inputs, {"ssm_scan": 1}),
    Case("scan-discretised-shared-view", lambda: StepDiscretisedScan("shared"), scan_inputs, {"ssm_scan": 1}),
    Case("mamba2-minimal-1group", lambda: Mamba2Minimal(), lambda: mamba2_inputs(), {"ssd_scan": 1}),
    Case("mamba2-minimal-2groups", lambda: Mamba2Minimal(groups=2), lambda: mamba2_inputs(groups=2),
         {"ssd_scan": 1}),
    Case("mamba2-minimal-padded", lambda: Mamba2Minimal(pad=True), lambda: mamba2_inputs(seqlen=10),
         {"ssd_scan": 1}),
    Case("mamba2-minimal-initial-state", lambda: Mamba2Minimal(initial=True), lambda: mamba2_inputs(),
         {"ssd_scan": 1}),
    Case("mamba2-minimal-bf16", lambda: Mamba2Minimal(), lambda: mamba2_inputs(), {"ssd_scan": 1}, bf16, True),
    Case("ssd-quadratic-masked-attention", lambda: Mamba2Minimal(scan=ssd_quadratic), lambda: mamba2_inputs(seqlen=7),
         {"ssd_scan": 1}),
    Case("ssd-quadratic-2groups", lambda: Mamba2Minimal(groups=2, scan=ssd_quadratic),
         lambda: mamba2_inputs(groups=2), {"ssd_scan": 1}),
    Case("mamba2-minimal-step", lambda: Mamba2MinimalStep(),
         lambda: [torch.randn(2, 16), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)], {"ssd_scan": 1}),
    Case("mamba2-minimal-unstable-segsum", lambda: Mamba2Minimal(segsum=segsum_unstable), lambda: mamba2_inputs(),
         {"ssd_scan": 1}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_spelling_fuses_and_matches(case: Case):
    torch.manual_seed(0)
    module = case.build().eval()
    module = module.to(case.dtype) if case.cast_module else module
    compiled = compiler.compile(copy.deepcopy(module), strict=True)
    reference = copy.deepcopy(module).double()
    for seed in (1, 2):  # the second call on fresh inputs reuses the compiled graph
        torch.manual_seed(seed)
        inputs = cast_inputs(case.inputs(), case.dtype)
        with torch.no_grad():
            outputs = compiled(*inputs), module(*inputs), reference(*cast_inputs(inputs, torch.float64))
        if seed == 1:
            assert {family: compiled.patterns.count(family) for family in case.fused} == case.fused, compiled.report()
        for ours, baseline, exact in zip(*(out if isinstance(out, tuple) else (out,) for out in outputs)):
            assert_close_by_rule(ours, baseline, exact)


@pytest.mark.parametrize("build, inputs, pattern, node, reason", [
    (lambda: StepDiscretisedScan("exp"), scan_inputs, "ssm_scan", "u_i", "computed in the loop, not read at step"),
    (MambaTinyScan, scan_inputs, "ssm_scan", "cumsum_1", "a cumsum over a decayed running sum"),
    (HeinsenScan, scan_inputs, "ssm_scan", "logcumsumexp", "a logcumsumexp over a decayed running sum"),
    (MambaPyPScan, scan_inputs, "ssm_scan", "add__", "a linear recurrence h = a * h + b unrolled from a loop"),
    (CombinedRef, lambda: [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4), torch.randn(2, 8, 2, 4),
                           torch.randn(2, 8, 2, 4), torch.randn(2, 8, 4, 4)],
     "ssd_scan", "decay_chunk", "exp of the pairwise differences of a cumsum"),
    (lambda: ChannelMixingSpectralConv(3, 20), lambda: [torch.randn(2, 3, 20)], "long_conv", "out_f",
     "not a product of two spectra"),
    (lambda: CarriedStateConv(6, 4), lambda: [torch.randn(2, 6, 20), torch.randn(2, 6, 3)], "short_conv", "out",
     "causal needs padding=3"),
], ids=["per-step-exp-under-update", "mamba-tiny-cumsum", "heinsen-log-space", "mamba.py-pscan",
        "ssd-chunk-scan-combined-ref", "channel-mixing-fft", "carried-state-conv"])
def test_unfused_forms_run_eagerly_and_are_reported(build, inputs, pattern, node, reason):
    torch.manual_seed(0)
    module = build().eval()
    compiled = compiler.compile(copy.deepcopy(module))
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), module(*args))
    assert compiled.patterns.count(pattern) == 0, compiled.report()
    misses = [miss for miss in compiled._report.near_misses if miss.pattern == pattern]
    assert misses and misses[0].node.startswith(node) and reason in misses[0].reason, compiled.report()


def test_conv_decode_step_keeps_its_cache_exact():
    torch.manual_seed(0)
    module = ConvStep(6, 4).eval()
    ours_module, reference_module = copy.deepcopy(module), copy.deepcopy(module).double()
    compiled = compiler.compile(ours_module)
    for _ in range(2):
        x = torch.randn(2, 6)
        with torch.no_grad():
            assert_close_by_rule(compiled(x), module(x), reference_module(x.double()))
        assert_close_by_rule(ours_module.conv_state, module.conv_state, reference_module.conv_state)

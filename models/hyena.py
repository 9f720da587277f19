"""Hyena (Poli et al., 2023, "Hyena Hierarchy"): a language model whose mixer interleaves implicit
long convolutions, applied by FFT, with multiplicative gating; written the way its code writes it.

The Hyena operator of order 2 on x (b, L, d):

    x0, x1, v = split(short_conv(in_proj(x)))       (b, d, L) each; short_conv: depthwise causal,
                                                     kernel 3, written as conv1d(padding=2)[..., :L]
    h         = implicit filter for L steps          (d, L), computed from parameters per call
    v         = fftconv(v * x1, h, bias)             long convolution of the gated stream
    out       = out_proj(v * x0)

    fftconv(u, h, D) = irfft(rfft(u, n=2L) * rfft(h, n=2L) / 2L, n=2L, norm="forward")[..., :L] + u * D

The implicit filter is an MLP with sine activations over positional features, times a decaying
exponential window per channel:

    z_t  = [t / (l_max - 1), cos(f_j w_t), -sin(f_j w_t)]   w_t = 2 pi t / l_max, emb_dim features
    h_t  = (Linear -> Sin) x (1 + n_inner) -> Linear(d) of z_t,  times exp(-t / (l_max - 1) |delta_c|)

The language model: embedding -> n_layer pre-norm blocks (x + Hyena(ln(x)), x + MLP(ln(x))) ->
final LayerNorm -> lm head tied to the embedding (models/lm.py, shared with the other model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from models import lm


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (b, H, L) with the filter k (H, L) by FFT, plus the skip u * D (D (H,)).

    Hyena's spelling: the filter's spectrum is divided by the FFT size and the inverse transform
    is unnormalised (norm="forward"). Computes in the filter's dtype, at least float32 (as Hyena's
    FFTs run under autocast: torch.fft takes no bfloat16), and returns u's dtype.
    """
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k = k.to(dtype=torch.promote_types(k.dtype, torch.float32))
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


@dataclass(frozen=True)
class HyenaConfig:
    vocab_size: int = 50304
    d_model: int = 768
    n_layer: int = 18
    l_max: int = 8192
    filter_order: int = 64
    emb_dim: int = 33
    short_filter_order: int = 3
    num_inner_mlps: int = 2
    sin_freq: float = 1.0
    mlp_ratio: int = 4
    norm_eps: float = 1e-5

    @classmethod
    def tiny(cls, **overrides) -> HyenaConfig:
        """For CPU tests: 32 channels, 2 layers, filters for up to 128 steps."""
        return replace(cls(vocab_size=64, d_model=32, n_layer=2, l_max=128, filter_order=16, emb_dim=5), **overrides)

    @classmethod
    def hyena_150m(cls, **overrides) -> HyenaConfig:
        """The shapes of Hyena-150M (with filters for up to 8K steps)."""
        return replace(cls(), **overrides)


class Sin(nn.Module):
    """sin(freq * x) with a learned frequency per feature."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """z (1, l_max, emb_dim): normalised time, then cos and -sin of emb_dim // 2 frequencies; t (1, l_max, 1)."""

    def __init__(self, emb_dim: int, l_max: int):
        super().__init__()
        t = torch.linspace(0, 1, l_max)[None, :, None]
        bands = (emb_dim - 1) // 2
        w = 2 * math.pi * torch.arange(l_max, dtype=torch.float32)[None, :, None] / l_max
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        self.z = nn.Parameter(torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t, persistent=False)

    def forward(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:, :seqlen], self.t[:, :seqlen]


class ExponentialModulation(nn.Module):
    """Multiply channel c of the filter by exp(-t |delta_c|), decay rates spaced between a slow
    and a fast one (the filter falls to `target` at fractions slow_decay_pct .. fast_decay_pct)."""

    def __init__(self, d_model: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model)[None, None], persistent=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(-t * self.deltas.abs())


class HyenaFilter(nn.Module):
    """The implicit long filter (L, d_model) and the long convolution's skip weights (bias)."""

    def __init__(self, config: HyenaConfig):
        super().__init__()
        order, d = config.filter_order, config.d_model
        self.bias = nn.Parameter(torch.randn(d))
        self.pos_emb = PositionalEmbedding(config.emb_dim, config.l_max)
        act = Sin(order, config.sin_freq)
        layers = [nn.Linear(config.emb_dim, order), act]
        for _ in range(config.num_inner_mlps):
            layers += [nn.Linear(order, order), act]
        layers.append(nn.Linear(order, d, bias=False))
        self.implicit_filter = nn.Sequential(*layers)
        self.modulation = ExponentialModulation(d)

    def filter(self, seqlen: int) -> torch.Tensor:
        """(1, L, d_model): the MLP over positions, times the decay window."""
        z, t = self.pos_emb(seqlen)
        return self.modulation(t, self.implicit_filter(z))

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The long convolution of x (b, d_model, L) with k (d_model, L), skip weights `bias`."""
        return fftconv(x, k, self.bias)


class HyenaOperator(nn.Module):
    """The order-2 Hyena mixer: (b, L, d_model) -> (b, L, d_model)."""

    def __init__(self, config: HyenaConfig):
        super().__init__()
        d = config.d_model
        self.d_model, self.l_max = d, config.l_max
        inner = 3 * d
        self.in_proj = nn.Linear(d, inner)
        self.out_proj = nn.Linear(d, d)
        width = config.short_filter_order
        self.short_filter = nn.Conv1d(inner, inner, width, padding=width - 1, groups=inner)
        self.filter_fn = HyenaFilter(config)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        seqlen = u.shape[1]
        if seqlen > self.l_max:
            raise ValueError(f"sequence length {seqlen} exceeds l_max {self.l_max}")
        u = self.in_proj(u).transpose(1, 2)
        uc = self.short_filter(u)[..., :seqlen]
        x0, x1, v = uc.split(self.d_model, dim=1)
        k = self.filter_fn.filter(seqlen)[0].transpose(0, 1)
        v = self.filter_fn(v * x1, k)
        return self.out_proj((v * x0).transpose(1, 2))


class HyenaLM(lm.SequenceLM):
    """Token ids (b, L) -> logits (b, L, vocab_size), every block mixing with HyenaOperator."""

    def __init__(self, config: HyenaConfig):
        super().__init__(config, HyenaOperator)


def example(config: HyenaConfig, batch: int = 2, length: int = 64, seed: int = 0):
    """(model in eval mode, example args) for the CLI and the demo."""
    return lm.example(lambda: HyenaLM(config), batch, length, seed)


def tiny():
    return example(HyenaConfig.tiny())


def hyena_150m(batch: int = 8, length: int = 2048):
    return example(HyenaConfig.hyena_150m(), batch=batch, length=length)

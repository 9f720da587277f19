"""The long- and short-convolution passes recognise FFT convolutions and depthwise causal conv1d
however they are spelled, and their kernels match eager.

Every equivalence test asserts the pass fired (the fused op's pattern appears as often as expected)
and that the compiled output is within the tolerance rule of fp64 eager. Inputs follow FlashFFTConv's
tests: u scaled by 0.1, filters k[h, t] = randn * exp(-r_h t) with decay rates from 2/L to 20/L.
Without CUDA the kernels run on Triton's interpreter, so the cases cover each value of B {1, 2},
H {3, 8, 111}, L {1, 100, 256, 1000, 1024, 4096}, dtype and spelling rather than their product.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from compiler.passes.long_conv import fft_conv_reference
from compiler.passes.short_conv import causal_depthwise_conv_reference
from models import h3, hyena
from tests.compiler.equivalence import assert_compiles_equivalent, cast_inputs
from tests.numerics import assert_close_by_rule

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
NORM_POWER = {"backward": 0.0, "ortho": 0.5, "forward": 1.0}  # a forward transform scales by n^-power


def decaying_filter(channels: int, taps: int, seed: int = 0) -> torch.Tensor:
    """k[h, t] = randn * exp(-r_h t), decay rates r_h from 2 / taps to 20 / taps."""
    generator = torch.Generator().manual_seed(seed)
    rates = torch.linspace(2.0, 20.0, channels)[:, None] / taps
    return torch.randn(channels, taps, generator=generator) * torch.exp(-rates * torch.arange(taps))


def sequence(*shape: int, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# -- long convolutions, as papers and their code write them ---------------------------------------
class LongConv(nn.Module):
    """A decaying filter k (H, Lk) and skip weights D (H,) as parameters; u (B, H, L) scaled by 0.1."""

    def __init__(self, channels: int, taps: int):
        super().__init__()
        self.k = nn.Parameter(decaying_filter(channels, taps))
        self.D = nn.Parameter(sequence(channels, seed=2))

    def inputs(self, batch: int, seqlen: int) -> tuple[torch.Tensor, ...]:
        return (sequence(batch, self.k.shape[0], seqlen, scale=0.1),)


class FlashConv(LongConv):
    """H3's FlashConv, through the pass's own reference: irfft(rfft(u) * rfft(k))[..., :L] + u * D."""

    def forward(self, u):
        return fft_conv_reference(u.float(), self.k.float(), self.D.float()).to(u.dtype)


class PlainConv(LongConv):
    """No skip: irfft(rfft(u, n=2L) * rfft(k, n=2L), n=2L)[..., :L]."""

    def forward(self, u):
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(self.k.float(), n=n), n=n)
        return y[..., :u.shape[-1]].to(u.dtype)


class HyenaConv(LongConv):
    """Hyena's spelling (models.hyena.fftconv): rfft(k, n=2L) / 2L and irfft(..., norm="forward")."""

    def forward(self, u):
        return hyena.fftconv(u, self.k.float(), self.D)


class NormConv(LongConv):
    """Each transform with its own norm; the factor that makes the result the plain convolution is
    applied at `place`: on U, on K (as a division), before the product, on y, or on the output
    (which scales the skip too)."""

    def __init__(self, channels: int, taps: int, norms=("backward",) * 3, place: str = "y"):
        super().__init__(channels, taps)
        self.norms, self.place = norms, place

    def forward(self, u):
        seqlen = u.shape[-1]
        n = 2 * seqlen
        u_norm, k_norm, inverse_norm = self.norms
        factor = float(n) ** (NORM_POWER[u_norm] + NORM_POWER[k_norm] - NORM_POWER[inverse_norm])
        u_f = torch.fft.rfft(u.float(), n=n, norm=u_norm)
        k_f = torch.fft.rfft(self.k.float(), n=n, norm=k_norm)
        u_f = u_f * factor if self.place == "U" else u_f
        k_f = k_f / (1.0 / factor) if self.place == "K" else k_f
        product = factor * (u_f * k_f) if self.place == "product" else u_f * k_f
        y = torch.fft.irfft(product, n=n, norm=inverse_norm)[..., :seqlen]
        y = y * factor if self.place == "y" else y
        out = y + u * self.D.unsqueeze(-1)
        return (out * factor if self.place == "out" else out).to(u.dtype)


class PaddedConv(LongConv):
    """u and k zero-padded to 2L with F.pad, the transforms without n, the filter shorter than L."""

    def __init__(self, channels: int, seqlen: int):
        super().__init__(channels, max(1, seqlen // 3))

    def forward(self, u):
        seqlen = u.shape[-1]
        u_f = torch.fft.rfft(F.pad(u.float(), (0, seqlen)))
        k_f = torch.fft.rfft(F.pad(self.k.float(), (0, 2 * seqlen - self.k.shape[-1])))
        return (torch.fft.irfft(u_f * k_f)[..., :seqlen] + u * self.D[:, None]).to(u.dtype)


class UnbatchedConv(LongConv):
    """u (H, L) with no batch dim, n the next power of two >= 2L, the whole output scaled (the skip too)."""

    def inputs(self, batch, seqlen):
        return (sequence(self.k.shape[0], seqlen, scale=0.1),)

    def forward(self, u):
        seqlen = u.shape[-1]
        n = 1 << (2 * seqlen - 1).bit_length()
        y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(self.k.float(), n=n), n=n)[..., :seqlen]
        return ((y + u * self.D[:, None]) * 0.5).to(u.dtype)


class GroupedConv(LongConv):
    """u (B, G, H, L) with a filter (G, H, L) and D (G, H, 1): G * H channels."""

    def __init__(self, channels: int, taps: int, groups: int = 2):
        super().__init__(channels * groups, taps)
        self.groups = groups

    def inputs(self, batch, seqlen):
        return (sequence(batch, self.groups, self.k.shape[0] // self.groups, seqlen, scale=0.1),)

    def forward(self, u):
        n = 2 * u.shape[-1]
        k = self.k.float().view(self.groups, -1, self.k.shape[-1])
        y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]
        return (y + u * self.D.view(self.groups, -1, 1)).to(u.dtype)


class ComplexConv(LongConv):
    """The complex form: ifft(fft(u, n) * fft(k, n)).real[..., :L] (or .real after the slice) + u * D."""

    def __init__(self, channels: int, taps: int, real_first: bool = True):
        super().__init__(channels, taps)
        self.real_first = real_first

    def forward(self, u):
        seqlen = u.shape[-1]
        n = 2 * seqlen
        y = torch.fft.ifft(torch.fft.fft(u.float(), n=n) * torch.fft.fft(self.k.float(), n=n), n=n)
        y = y.real[..., :seqlen] if self.real_first else torch.real(y[..., :seqlen])
        return (y + u * self.D[:, None]).to(u.dtype)


class GatedConv(LongConv):
    """Gates before and after (Hyena's order 2), D as (1, H, 1): post * (conv(x * pre, k) + (x * pre) * D)."""

    def inputs(self, batch, seqlen):
        channels = self.k.shape[0]
        return sequence(batch, channels, seqlen, scale=0.1), sequence(batch, channels, seqlen, seed=3), \
            sequence(batch, channels, seqlen, seed=4)

    def forward(self, x, pre, post):
        u = x * pre
        n = 2 * x.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u.to(torch.float32), n=n) * torch.fft.rfft(self.k.float(), n=n), n=n)
        return post * (y[..., :x.shape[-1]] + u * self.D.view(1, -1, 1)).to(x.dtype)


class TransposedConv(LongConv):
    """u a (B, L, H) activation seen transposed, the filter broadcast as (1, H, L), D as (H, 1)."""

    def inputs(self, batch, seqlen):
        return (sequence(batch, seqlen, self.k.shape[0], scale=0.1),)

    def forward(self, x):
        u = x.transpose(1, 2)
        seqlen = u.shape[-1]
        k_f = torch.fft.rfft(self.k.float().unsqueeze(0), n=2 * seqlen)
        y = torch.fft.irfft(torch.fft.rfft(u.float(), n=2 * seqlen) * k_f, n=2 * seqlen)[..., :seqlen]
        return (y + u * self.D.unsqueeze(-1)).to(x.dtype).transpose(1, 2)


class TimeMajorConv(LongConv):
    """(B, L, H) activations transformed along dim 1 (time-major code), the filter stored (L, H) and
    zero-padded along time with F.pad, D broadcast as (H,), a post gate."""

    def inputs(self, batch, seqlen):
        channels = self.k.shape[0]
        return sequence(batch, seqlen, channels, scale=0.1), sequence(batch, seqlen, channels, seed=3)

    def forward(self, x, gate):
        seqlen = x.shape[1]
        k = F.pad(self.k.t().float(), (0, 0, 0, seqlen))
        spectrum = torch.fft.rfft(x.float(), n=2 * seqlen, dim=1) * torch.fft.rfft(k, dim=0)
        y = torch.fft.irfft(spectrum, n=2 * seqlen, dim=-2)[:, :seqlen]
        return ((y + x * self.D) * gate).to(x.dtype)


class ImplicitFilterConv(GatedConv):
    """The filter computed per call from parameters (Hyena): an MLP over positions times a decay, then
    H3's fftconv_ref on the gated input, gated again."""

    def __init__(self, channels: int, taps: int):
        super().__init__(channels, taps)
        self.mlp = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, channels))
        self.rates = nn.Parameter(torch.linspace(2.0, 20.0, channels))

    def forward(self, x, pre, post):
        t = torch.linspace(0, 1, x.shape[-1], device=x.device, dtype=self.rates.dtype)[:, None]
        k = (self.mlp(t) * torch.exp(-t * self.rates)).transpose(0, 1)
        return h3.fftconv_ref(x * pre, k.float(), self.D) * post


class CircularConv(LongConv):
    """n = L: the product of the spectra wraps around, a circular convolution of period L."""

    def forward(self, u):
        seqlen = u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=seqlen) * torch.fft.rfft(self.k, n=seqlen), n=seqlen)
        return y[..., :seqlen]


class LongFilterConv(LongConv):
    """A filter of L + 5 taps, cropped to n = 2L by rfft: a circular convolution of period 2L."""

    def forward(self, u):
        seqlen = u.shape[-1]
        k = torch.cat([self.k, self.k[:, :5]], dim=-1)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * seqlen) * torch.fft.rfft(k, n=2 * seqlen), n=2 * seqlen)
        return y[..., :seqlen]


class MixedDimsConv(LongConv):
    """The signal transformed along dim 1, the filter along its last dim and its spectrum transposed
    (a spectrum that is no transform along the time dim: its inverse transform is the filter)."""

    def forward(self, u):
        seqlen = u.shape[-1]
        x = u.transpose(1, 2)
        spectrum = torch.fft.rfft(x, n=2 * seqlen, dim=1) * torch.fft.rfft(self.k, n=2 * seqlen).t()
        y = torch.fft.irfft(spectrum, n=2 * seqlen, dim=1)
        return y[:, :seqlen].transpose(1, 2)


class SharedRowFilterConv(LongConv):
    """A filter per batch row (B, 1, L) shared by the channels: read the other way round, u's rows are
    the filters and the per-row filter the signal broadcast over them (convolution commutes)."""

    def forward(self, u):
        seqlen = u.shape[-1]
        k = self.k[:1] * (1 + torch.arange(u.shape[0], dtype=u.dtype))[:, None, None]
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * seqlen) * torch.fft.rfft(k, n=2 * seqlen), n=2 * seqlen)
        return y[..., :seqlen]


class OuterProductConv(LongConv):
    """Filters (B, 2, 1, L) per batch row and output channel, against u (B, 1, H, L): no factor is
    shared by the batch rows, so every (b, c, h) is a channel, each factor broadcast (copied) to them."""

    def forward(self, u):
        seqlen = u.shape[-1]
        k = (self.k[:2] * (1 + torch.arange(u.shape[0], dtype=u.dtype))[:, None, None])[:, :, None]
        y = torch.fft.irfft(torch.fft.rfft(u[:, None], n=2 * seqlen) * torch.fft.rfft(k, n=2 * seqlen), n=2 * seqlen)
        return y[..., :seqlen]


@dataclass(frozen=True)
class Case:
    form: type
    batch: int
    channels: int
    seqlen: int
    dtype: torch.dtype = fp32
    options: tuple = ()

    def __str__(self) -> str:
        options = "".join(f"-{value}" for value in self.options)
        return f"{self.form.__name__}{options}-b{self.batch}h{self.channels}l{self.seqlen}-{self.dtype}"

    def build(self):
        torch.manual_seed(0)
        module = self.form(self.channels, self.seqlen, *self.options)
        return module, module.inputs(self.batch, self.seqlen)


LONG_CASES = [
    Case(FlashConv, 1, 3, 1),
    Case(PlainConv, 2, 8, 100, bf16),
    Case(GatedConv, 2, 3, 256, fp16),
    Case(HyenaConv, 1, 8, 1000),
    Case(FlashConv, 2, 3, 1024, bf16),
    Case(ComplexConv, 1, 8, 4096),
    Case(TransposedConv, 2, 111, 100, bf16),
    Case(ImplicitFilterConv, 2, 8, 1024, fp16),
    Case(FlashConv, 1, 111, 256),
    Case(GatedConv, 2, 3, 4096, bf16),
    Case(ComplexConv, 2, 3, 1000, fp16, (False,)),
    Case(PaddedConv, 2, 8, 1000, bf16),
    Case(UnbatchedConv, 1, 8, 100, fp16),
    Case(GroupedConv, 2, 3, 256, fp32),
    Case(TimeMajorConv, 2, 8, 100, bf16),
    Case(TimeMajorConv, 1, 3, 256, fp32),
    Case(CircularConv, 2, 3, 100, fp32),
    Case(LongFilterConv, 1, 8, 113, fp32),
    Case(MixedDimsConv, 2, 3, 100, fp32),
    Case(SharedRowFilterConv, 2, 3, 100, fp32),
    Case(OuterProductConv, 2, 3, 100, fp32),
]

NORM_CASES = [
    Case(NormConv, 1, 3, 100, fp32, (("backward", "backward", "backward"), "y")),
    Case(NormConv, 2, 3, 100, fp32, (("backward", "backward", "forward"), "K")),
    Case(NormConv, 1, 3, 100, bf16, (("ortho", "ortho", "ortho"), "y")),
    Case(NormConv, 1, 3, 256, fp32, (("forward", "backward", "backward"), "U")),
    Case(NormConv, 2, 3, 100, fp16, (("ortho", "forward", "backward"), "product")),
    Case(NormConv, 1, 3, 100, fp32, (("backward", "ortho", "forward"), "out")),
]


@pytest.mark.parametrize("case", LONG_CASES + NORM_CASES, ids=str)
def test_long_convolutions_fuse_and_match(case: Case):
    module, args = case.build()
    assert_compiles_equivalent(module, args, case.dtype, "long_conv")


def test_report_names_what_was_fused():
    module, args = Case(GatedConv, 1, 3, 100).build()
    compiled = assert_compiles_equivalent(module, args, fp32, "long_conv")
    assert "long_conv: long_conv_0 (irfft n=200, L=100: D skip, pre-gate, post-gate)" in compiled.report()


def test_output_keeps_the_eager_layout():
    """A (B, L, H) input seen transposed gives the eager output's strides, not a contiguous copy of them."""
    module, (x,) = Case(TransposedConv, 2, 8, 100).build()
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        ours, eager = compiled(x), module(x)
    assert ours.stride() == eager.stride() and ours.dtype == eager.dtype


def test_inputs_requiring_grad_run_the_forward_and_backward_kernels():
    module, (u,) = Case(FlashConv, 2, 3, 100).build()
    compiled = compiler.compile(module, strict=True)
    ours = compiled(u)
    torch.testing.assert_close(ours, module(u))
    (ours_grad,) = torch.autograd.grad(ours.sum(), [module.k])
    (eager_grad,) = torch.autograd.grad(module(u).sum(), [module.k])
    torch.testing.assert_close(ours_grad, eager_grad)
    assert "ran in PyTorch" not in compiled.report()
    assert [kernel.name for kernel in compiled.kernels] == ["long_conv_D", "long_conv_backward_D"]


# -- short convolutions ----------------------------------------------------------------------------
class ShortConv(nn.Module):
    """nn.Conv1d(padding=K-1, groups=C) cut to [..., :L], then nothing, F.silu, nn.SiLU, y * sigmoid(y),
    F.relu, nn.GELU or F.gelu(approximate="tanh")."""

    def __init__(self, channels: int, width: int, activation: str = "none", transposed: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, width, padding=width - 1, groups=channels)
        self.act = nn.SiLU()
        self.activation, self.transposed = activation, transposed

    def forward(self, x):
        x = x.transpose(1, 2) if self.transposed else x
        y = self.conv(x)[..., :x.shape[-1]]
        if self.activation == "F.silu":
            return F.silu(y)
        if self.activation == "nn.SiLU":
            return self.act(y)
        if self.activation in ("F.relu", "nn.GELU", "gelu_tanh"):
            return {"F.relu": F.relu, "nn.GELU": nn.GELU(), "gelu_tanh": nn.GELU("tanh")}[self.activation](y)
        return y * torch.sigmoid(y) if self.activation == "sigmoid" else y


class PaddedShortConv(ShortConv):
    """F.pad(x, (K-1, 0)) then an unpadded depthwise F.conv1d (the layer's weight, without its bias)."""

    def forward(self, x):
        width = self.conv.weight.shape[-1]
        y = F.conv1d(F.pad(x, (width - 1, 0)), self.conv.weight, groups=x.shape[1])
        return y * y.sigmoid() if self.activation == "sigmoid" else y


class ConcatPaddedShortConv(ShortConv):
    """Causal padding by concatenating zeros in front, then an unpadded F.conv1d with the bias."""

    def forward(self, x):
        width = self.conv.weight.shape[-1]
        padded = torch.cat([x.new_zeros(x.shape[0], x.shape[1], width - 1), x], dim=-1)
        return F.silu(F.conv1d(padded, self.conv.weight, self.conv.bias, groups=x.shape[1]))


class ReferenceShortConv(ShortConv):
    """The pass's own reference: silu(conv1d(x, w, b, padding=K-1, groups=C)[..., :L])."""

    def forward(self, x):
        return causal_depthwise_conv_reference(x, self.conv.weight, self.conv.bias)


@pytest.mark.parametrize("form, width, activation, batch, channels, seqlen, dtype, transposed", [
    (ShortConv, 2, "none", 1, 8, 100, fp32, False),
    (ShortConv, 3, "F.silu", 2, 111, 1000, bf16, False),
    (ShortConv, 4, "nn.SiLU", 2, 8, 256, fp16, True),
    (PaddedShortConv, 7, "sigmoid", 2, 3, 1024, fp32, False),
    (PaddedShortConv, 4, "none", 1, 3, 1, bf16, False),
    (ConcatPaddedShortConv, 4, "F.silu", 2, 37, 300, bf16, False),
    (ReferenceShortConv, 3, "F.silu", 2, 8, 4096, fp32, False),
    (ShortConv, 4, "F.relu", 2, 37, 300, bf16, False),
    (ShortConv, 3, "nn.GELU", 1, 8, 113, fp32, True),
    (ShortConv, 5, "gelu_tanh", 2, 3, 256, fp16, False),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_short_convolutions_fuse_and_match(form, width, activation, batch, channels, seqlen, dtype, transposed):
    """transposed: x is a (B, L, H) activation the module transposes first."""
    torch.manual_seed(0)
    module = form(channels, width, activation, transposed)
    x = sequence(batch, seqlen, channels) if transposed else sequence(batch, channels, seqlen)
    compiled = assert_compiles_equivalent(module, (x,), dtype, "short_conv")
    fused = {"none": "no activation)", "F.relu": "relu)", "nn.GELU": "gelu)", "gelu_tanh": "gelu_tanh)"}
    expected = "silu)" if form in (ReferenceShortConv, ConcatPaddedShortConv) else fused.get(activation, "silu)")
    assert expected in compiled.report(), compiled.report()


# -- whole models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, dtype", [(h3.tiny, bf16), (h3.tiny, fp32), (hyena.tiny, bf16), (hyena.tiny, fp32)],
                         ids=["h3-bf16", "h3-fp32", "hyena-bf16", "hyena-fp32"])
def test_tiny_models_fuse_every_convolution(factory, dtype):
    """H3: two long convolutions per layer (shift and diagonal SSM); Hyena: one long and one short."""
    model, args = factory()
    layers = model.config.n_layer
    long_per_layer, short_per_layer = (2, 0) if factory is h3.tiny else (1, 1)
    compiled = assert_compiles_equivalent(model, args, dtype, "long_conv", long_per_layer * layers)
    assert compiled.patterns.count("short_conv") == short_per_layer * layers, compiled.report()


# -- near-misses -----------------------------------------------------------------------------------
class CroppingConv(LongConv):
    """n = L // 2: the transforms crop the signal."""

    def forward(self, u):
        n = u.shape[-1] // 2
        return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k, n=n), n=n)


class FlatSpectrumConv(LongConv):
    """The filter's spectrum averaged over frequency, broadcast along time."""

    def forward(self, u):
        seqlen = u.shape[-1]
        k_f = torch.fft.rfft(self.k, n=2 * seqlen).mean(-1, keepdim=True)
        return torch.fft.irfft(torch.fft.rfft(u, n=2 * seqlen) * k_f, n=2 * seqlen)[..., :seqlen]


class ShiftedSliceConv(LongConv):
    """Steps 1..L of the result: not causal."""

    def forward(self, u):
        seqlen = u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * seqlen) * torch.fft.rfft(self.k, n=2 * seqlen), n=2 * seqlen)
        return y[..., 1:seqlen + 1]


class ReturnsSpectrumConv(LongConv):
    """The input's spectrum is returned too."""

    def forward(self, u):
        seqlen = u.shape[-1]
        u_f = torch.fft.rfft(u, n=2 * seqlen)
        y = torch.fft.irfft(u_f * torch.fft.rfft(self.k, n=2 * seqlen), n=2 * seqlen)
        return y[..., :seqlen], u_f.abs()


@pytest.mark.parametrize("form, node, reason", [
    (CroppingConv, "fft_irfft", "n=50 < L=100: the transform crops the signal"),
    (FlatSpectrumConv, "k_f", "the filter's spectrum has 1 frequencies, the product 101: it is broadcast along time"),
    (ShiftedSliceConv, "getitem", "keeps steps 1..101 of the 200-point result, not the first L=100: not a causal convolution"),
    (ReturnsSpectrumConv, "u_f", "intermediate is also read by abs"),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_long_conv_near_misses_are_reported_and_run_in_pytorch(form, node, reason):
    torch.manual_seed(0)
    module = form(3, 100)
    check_near_miss(module, module.inputs(2, 100), "long_conv", node, reason)


class ShortConvVariant(nn.Module):
    """nn.Conv1d(3, 3, width, **options) cut to [..., start:start + L]."""

    def __init__(self, width: int = 3, start: int = 0, **options):
        super().__init__()
        options = {"padding": width - 1, "groups": 3, **options}
        self.conv = nn.Conv1d(3, options.pop("out_channels", 3), width, **options)
        self.start = start

    def forward(self, x):
        return self.conv(x)[..., self.start:self.start + x.shape[-1]]


@pytest.mark.parametrize("options, reason", [
    (dict(dilation=2, padding=4), "dilation 2: the kernel has no dilated taps"),
    (dict(stride=2), "stride 2: a causal short convolution has stride 1"),
    (dict(groups=1), "groups=1 with 3 channels and weight (3, 3, 3): not depthwise"),
    (dict(out_channels=6), "groups=3 with 3 channels and weight (6, 1, 3): not depthwise"),
    (dict(width=9), "kernel size 9 is outside 2..8"),
    (dict(padding="same"), "padding='same': causal needs padding=2"),
    (dict(start=2), "keeps [2:102:1] of dim 2, not the first L=100 steps: not causal"),
], ids=str)
def test_short_conv_near_misses_are_reported_and_run_in_pytorch(options, reason):
    torch.manual_seed(0)
    node = "getitem" if "start" in options else "conv1d"
    check_near_miss(ShortConvVariant(**options), (sequence(2, 3, 100),), "short_conv", node, reason)


def check_near_miss(module, args, pattern: str, node: str, reason: str):
    compiled = compiler.compile(module.eval(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), module(*args))
    assert pattern not in compiled.patterns, compiled.report()
    (line,) = [line for line in compiled.report().splitlines() if f"{pattern} at" in line]
    assert f"node {node}: " in line and reason in line, compiled.report()


# -- on the GPU, at the sizes of FlashFFTConv's benchmarks -----------------------------------------
def assert_equivalent_by_batch_chunks(module, args, dtype, pattern: str, count: int, chunk: int = 8):
    """assert_compiles_equivalent for sizes whose fp64 (and fp32 FFT) eager runs only fit a few rows at a time."""
    compiled = compiler.compile(copy.deepcopy(module).to(dtype), strict=True)
    baseline_module, reference_module = copy.deepcopy(module).to(dtype), copy.deepcopy(module).double()
    with torch.no_grad():
        ours = compiled(*cast_inputs(args, dtype))
        rows = [[a[i:i + chunk] for a in args] for i in range(0, args[0].shape[0], chunk)]
        baseline = torch.cat([baseline_module(*cast_inputs(row, dtype)) for row in rows])
        reference = torch.cat([reference_module(*cast_inputs(row, torch.float64)) for row in rows])
    assert compiled.patterns.count(pattern) == count, compiled.report()
    assert_close_by_rule(ours, baseline, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1024, 4096, 16384])
def test_long_conv_at_scale(seqlen):
    torch.manual_seed(0)
    module = GatedConv(768, seqlen).cuda()
    args = [a.cuda() for a in module.inputs(64, seqlen)]
    assert_equivalent_by_batch_chunks(module, args, bf16, "long_conv", 1)


@pytest.mark.gpu
def test_short_conv_at_scale():
    torch.manual_seed(0)
    module = ShortConv(768, 4, "F.silu").cuda()
    assert_equivalent_by_batch_chunks(module, [sequence(64, 768, 16384).cuda()], bf16, "short_conv", 1)


@pytest.mark.gpu
@pytest.mark.parametrize("factory, long_per_layer", [(h3.h3_125m, 2), (hyena.hyena_150m, 1)],
                         ids=["h3_125m", "hyena_150m"])
def test_real_size_models(factory, long_per_layer):
    model, (ids,) = factory(batch=2, length=2048)
    model = model.cuda()
    assert_compiles_equivalent(model, (ids.cuda(),), bf16, "long_conv", long_per_layer * model.config.n_layer)

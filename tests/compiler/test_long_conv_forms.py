"""Long convolutions as their own repositories write them: S4's FFTConv (state-spaces), safari's
and M2's bidirectional fftconv_ref, bidirectional Hyena, and the other ways to write a spectral
product (einsum, broadcast). Each fuses into one long_conv op and matches fp64 eager by the
tolerance rule (tests/numerics.py), gradients included for the forms the op reads differently
(several filters per channel, a filter that is the inverse transform of a sum of spectra).

Mixed precision runs as these codebases run it: parameters in fp32, activations in bf16/fp16,
the FFTs in fp32 (`u.to(dtype=k.dtype)`), so the module stays fp32 and only the inputs change.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

import compiler
from tests.compiler.equivalence import cast_inputs
from tests.numerics import assert_close_by_rule

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
contract = torch.einsum  # state-spaces: `from opt_einsum import contract`, or torch.einsum without it


def assert_fuses_and_matches(module: nn.Module, args, dtype: torch.dtype, count: int = 1):
    """Compile the fp32 module; run it on inputs in `dtype`; outputs within the rule of fp64 eager."""
    module = module.eval()
    compiled = compiler.compile(copy.deepcopy(module), strict=True)
    inputs = cast_inputs(args, dtype)
    with torch.no_grad():
        reference = copy.deepcopy(module).double()(*cast_inputs(inputs, torch.float64))
        outputs = compiled(*inputs), module(*inputs), reference
    assert compiled.patterns.count("long_conv") == count, compiled.report()
    assert_close_by_rule(*(out[0] if isinstance(out, tuple) else out for out in outputs))
    return compiled


def assert_gradients_match(module: nn.Module, args):
    """Gradients of every parameter and input through the fused op, within the rule of fp64 eager."""
    compiled = compiler.compile(copy.deepcopy(module), strict=True)
    reference_module = copy.deepcopy(module).double()
    grads = []
    for model, dtype in ((compiled, fp32), (module, fp32), (reference_module, torch.float64)):
        inputs = [a.to(dtype).requires_grad_() for a in args]
        out = model(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        leaves = [p for p in model.parameters() if p.requires_grad] + inputs
        grads.append(torch.autograd.grad((out * weights.to(dtype)).sum(), leaves))
    assert compiled.patterns.count("long_conv") == 1, compiled.report()
    for ours, baseline, reference in zip(*grads):
        assert_close_by_rule(ours, baseline, reference)


# -- S4 (state-spaces/s4: models/s4/s4d.py's kernel, src/models/sequence/kernels/fftconv.py) ---------
class S4DKernel(nn.Module):
    """Generate convolution kernel from diagonal SSM parameters."""

    def __init__(self, d_model, N=8, channels=1, dt_min=0.001, dt_max=0.1):
        super().__init__()
        H = d_model
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(channels, H, N // 2, dtype=torch.cfloat)
        self.C = nn.Parameter(torch.view_as_real(C))
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(H, N // 2)))
        self.A_imag = nn.Parameter(math.pi * repeat(torch.arange(N // 2).float(), 'n -> h n', h=H))

    def forward(self, L):
        """returns: (C, H, L) convolution kernel"""
        dt = torch.exp(self.log_dt)  # (H)
        C = torch.view_as_complex(self.C)  # (C H N)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag  # (H N)
        dtA = A * dt.unsqueeze(-1)  # (H N)
        K = dtA.unsqueeze(-1) * torch.arange(L, device=A.device)  # (H N L)
        C = C * (torch.exp(dtA) - 1.) / A
        K = 2 * torch.einsum('chn, hnl -> chl', C, torch.exp(K)).real
        return K, None


class FFTConv(nn.Module):
    """Implements an FFT Convolution around a convolution kernel.

    d_model (H): Model dimension (in CNN terminology, this would be "channels").
    channels: Number of "heads"; the SSM maps a 1-dim to C-dim sequence, flattened as (B, C*H, L).
    bidirectional: Convolve the sequence forward and backward, with a filter of each.
    transposed: Backbone axis ordering of (B, L, D) (False) or (B, D, L) (True).
    """

    def __init__(self, d_model, l_max=None, channels=1, swap_channels=False, bidirectional=False,
                 activation='gelu', transposed=True):
        super().__init__()
        self.d_model = d_model
        self.L = self.l_max = l_max
        self.bidirectional = bidirectional
        self.channels = channels
        self.transposed = transposed
        self.swap_channels = swap_channels
        self.D = nn.Parameter(torch.randn(channels, self.d_model))
        if self.bidirectional:
            channels *= 2
        self.kernel = S4DKernel(self.d_model, channels=channels)
        self.activation = nn.GELU() if activation == 'gelu' else nn.Identity()
        self.drop = nn.Identity()
        self.drop_kernel = nn.Identity()

    def forward(self, x, state=None, rate=1.0, **kwargs):
        """x: (B D L) if self.transposed else (B L D)"""
        # Always work with (B D L) dimension in this module
        if not self.transposed:
            x = x.transpose(-1, -2)
        L = x.size(-1)

        # Compute SS Kernel
        l_kernel = L if self.L is None else min(L, round(self.L / rate))
        k, k_state = self.kernel(L=l_kernel)  # (C H L) (B C H L)

        # Convolution
        if self.bidirectional:
            k0, k1 = rearrange(k, '(s c) h l -> s c h l', s=2)
            k = F.pad(k0, (0, L)) + F.pad(k1.flip(-1), (L, 0))

        # Kernel dropout
        k = self.drop_kernel(k)

        k_f = torch.fft.rfft(k, n=l_kernel + L)  # (C H L)
        x_f = torch.fft.rfft(x, n=l_kernel + L)  # (B H L)
        y_f = contract('bhl,chl->bchl', x_f, k_f)
        y = torch.fft.irfft(y_f, n=l_kernel + L)[..., :L]  # (B C H L)

        # Compute D term in state space equation - essentially a skip connection
        y = y + contract('bhl,ch->bchl', x, self.D)

        # Reshape to flatten channels
        if self.swap_channels:
            y = rearrange(y, 'b c h l -> b (h c) l')
        else:
            y = rearrange(y, 'b c h l -> b (c h) l')

        y = self.drop(y)

        if not self.transposed:
            y = y.transpose(-1, -2)
        y = self.activation(y)

        return y, None


@pytest.mark.parametrize("channels, bidirectional, transposed, swap, seqlen", [
    (1, False, True, False, 100),
    (2, False, False, True, 113),
    (3, False, True, False, 64),
    (1, True, True, False, 100),
    (2, True, False, False, 77),
], ids=["C1", "C2-BLH-swap", "C3", "C1-bidirectional", "C2-bidirectional-BLH"])
def test_s4_fftconv(channels, bidirectional, transposed, swap, seqlen):
    torch.manual_seed(0)
    module = FFTConv(5, channels=channels, bidirectional=bidirectional, transposed=transposed, swap_channels=swap)
    x = torch.randn((2, 5, seqlen) if transposed else (2, seqlen, 5))
    compiled = assert_fuses_and_matches(module, (x,), fp32)
    assert "D skip" in compiled.report(), compiled.report()
    assert ("circular filter of period" in compiled.report()) == bidirectional, compiled.report()


def test_s4_fftconv_gradients():
    torch.manual_seed(0)
    assert_gradients_match(FFTConv(3, channels=2, activation="id"), (torch.randn(2, 3, 50),))


# -- safari / M2 (hyena_utils.fftconv_ref) and bidirectional Hyena ---------------------------------
def fftconv_ref(u, k, D, dropout_mask, gelu=True, k_rev=None):
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    if k_rev is not None:
        k_rev_f = torch.fft.rfft(k_rev, n=fft_size) / fft_size
        k_f = k_f + k_rev_f.conj()
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)

    if len(u.shape) > 3:
        k_f = k_f.unsqueeze(1)

    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]

    out = y + u * D.unsqueeze(-1)
    if gelu:
        out = F.gelu(out)
    if dropout_mask is not None:
        return (out * rearrange(dropout_mask, 'b H -> b H 1')).to(dtype=u.dtype)
    else:
        return out.to(dtype=u.dtype)


class BidirectionalConv(nn.Module):
    """fftconv_ref with a forward and a reverse filter, each a decaying parameter."""

    def __init__(self, d_model, seqlen, gelu=True, heads=0):
        super().__init__()
        rates = torch.linspace(2.0, 20.0, d_model)[:, None] / seqlen
        decay = torch.exp(-rates * torch.arange(seqlen))
        self.k = nn.Parameter(torch.randn(d_model, seqlen) * decay)
        self.k_rev = nn.Parameter(torch.randn(d_model, seqlen) * decay)
        self.D = nn.Parameter(torch.randn(d_model))
        self.gelu, self.heads = gelu, heads

    def forward(self, u, dropout_mask=None):
        if self.heads:  # (B, H, heads, L) activations: k_f.unsqueeze(1) broadcasts over the heads
            return fftconv_ref(u, self.k, self.D[:, None], dropout_mask, self.gelu, k_rev=self.k_rev)
        return fftconv_ref(u, self.k, self.D, dropout_mask, self.gelu, k_rev=self.k_rev)


@pytest.mark.parametrize("batch, channels, seqlen, dtype, gelu, dropout_mask", [
    (2, 8, 100, fp32, True, False),
    (1, 3, 256, bf16, False, True),
    (2, 5, 113, fp16, True, True),
])
def test_bidirectional_fftconv_ref(batch, channels, seqlen, dtype, gelu, dropout_mask):
    torch.manual_seed(0)
    module = BidirectionalConv(channels, seqlen, gelu=gelu)
    args = [torch.randn(batch, channels, seqlen) * 0.1]
    args += [(torch.rand(batch, channels) > 0.3).float() * 1.4] if dropout_mask else []
    compiled = assert_fuses_and_matches(module, args, dtype)
    assert "circular filter of period" in compiled.report(), compiled.report()


def test_bidirectional_fftconv_ref_with_heads():
    """u (B, H, heads, L): k_f.unsqueeze(1) broadcasts one filter spectrum over the heads."""
    torch.manual_seed(0)
    module = BidirectionalConv(4, 64, heads=2)
    assert_fuses_and_matches(module, [torch.randn(2, 4, 2, 64) * 0.1], fp32)


def test_bidirectional_fftconv_ref_gradients():
    torch.manual_seed(0)
    assert_gradients_match(BidirectionalConv(3, 50, gelu=False), (torch.randn(2, 3, 50) * 0.1,))


class Sin(nn.Module):
    def __init__(self, dim, w=10, train_freq=True):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim)) if train_freq else w * torch.ones(1, dim)

    def forward(self, x):
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    def __init__(self, emb_dim: int, seq_len: int, **kwargs):
        """Complex exponential positional embeddings for Hyena filters."""
        super().__init__()
        self.seq_len = seq_len
        # The time embedding fed to the filteres is normalized so that t_f = 1
        t = torch.linspace(0, 1, self.seq_len)[None, :, None]  # 1, L, 1
        bands = (emb_dim - 1) // 2
        # To compute the right embeddings we use the "proper" linspace
        t_rescaled = torch.linspace(0, seq_len - 1, seq_len)[None, :, None]
        w = 2 * math.pi * t_rescaled / seq_len  # 1, L, 1
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        z = torch.cat([t, z.real, z.imag], dim=-1)
        self.register_buffer("z", z)
        self.register_buffer("t", t)

    def forward(self, L):
        return self.z[:, :L], self.t[:, :L]


class ExponentialModulation(nn.Module):
    def __init__(self, d_model, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2, shift: float = 0.0):
        super().__init__()
        self.shift = shift
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        deltas = torch.linspace(min_decay, max_decay, d_model)[None, None]
        self.register_buffer("deltas", deltas)

    def forward(self, t, x):
        decay = torch.exp(-t * self.deltas.abs())
        x = x * (decay + self.shift)
        return x


class HyenaFilter(nn.Module):
    """Implicit long filter with modulation (M2's hyena_utils), bidirectional: a second implicit
    filter for the reverse direction, either padded and added in time or added as a conjugate
    spectrum (`spectrum_sum`)."""

    def __init__(self, d_model, emb_dim=3, order=16, seq_len=1024, w=1, bidirectional=True, spectrum_sum=False):
        super().__init__()
        self.d_model = d_model
        self.use_bias = True
        self.bias = nn.Parameter(torch.randn(self.d_model))
        self.bidirectional, self.spectrum_sum = bidirectional, spectrum_sum
        act = Sin(dim=order, w=w)
        self.emb_dim = emb_dim
        self.pos_emb = PositionalEmbedding(emb_dim, seq_len)
        self.implicit_filter = nn.Sequential(nn.Linear(emb_dim, order), act, nn.Linear(order, order), act,
                                             nn.Linear(order, d_model, bias=False))
        if self.bidirectional:
            self.implicit_filter_rev = nn.Sequential(nn.Linear(emb_dim, order), act, nn.Linear(order, order), act,
                                                     nn.Linear(order, d_model, bias=False))
        self.modulation = ExponentialModulation(d_model)

    def filter(self, L, *args, **kwargs):
        z, t = self.pos_emb(L)
        h = self.implicit_filter(z)
        h = self.modulation(t, h)
        return h

    def filter_rev(self, L, *args, **kwargs):
        z, t = self.pos_emb(L)
        h = self.implicit_filter_rev(z)
        h = self.modulation(t, h)
        return h

    def forward(self, x, L, k_fwd=None, k_rev=None, bias=None, *args, **kwargs):
        if k_fwd is None:
            k_fwd = rearrange(self.filter(L)[0], 'l d -> d l')
            if self.bidirectional and k_rev is None:
                k_rev = rearrange(self.filter_rev(L)[0], 'l d -> d l')

        if bias is None:
            bias = self.bias
        bias = bias if self.use_bias else 0 * bias

        if self.bidirectional and self.spectrum_sum:
            return fftconv_ref(x, k_fwd, bias, dropout_mask=None, gelu=False, k_rev=k_rev).to(dtype=x.dtype)
        if self.bidirectional:
            k = F.pad(k_fwd, (0, L)) + F.pad(k_rev.flip(-1), (L, 0))
        else:
            k = k_fwd
        y = fftconv_ref(x, k, bias, dropout_mask=None, gelu=False)
        return y.to(dtype=x.dtype)


class BidirectionalHyena(nn.Module):
    """An order-2 Hyena operator with a bidirectional long filter: in projection, the gates around
    the long convolution, out projection."""

    def __init__(self, d_model, seq_len, spectrum_sum=False):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.filter_fn = HyenaFilter(d_model, seq_len=seq_len, spectrum_sum=spectrum_sum)

    def forward(self, u):
        L = u.size(-2)
        u = self.in_proj(u)
        u = rearrange(u, 'b l d -> b d l')
        x1, x2, v = u.split(u.shape[1] // 3, dim=1)
        v = v * x1
        v = self.filter_fn(v, L)
        y = v * x2
        return self.out_proj(rearrange(y, 'b d l -> b l d'))


@pytest.mark.parametrize("spectrum_sum, seqlen", [(False, 64), (True, 100), (False, 37)],
                         ids=["pad-flip-add", "conj-spectrum", "pad-flip-add-L37"])
def test_bidirectional_hyena(spectrum_sum, seqlen):
    torch.manual_seed(0)
    module = BidirectionalHyena(6, seqlen, spectrum_sum=spectrum_sum)
    compiled = assert_fuses_and_matches(module, [torch.randn(2, seqlen, 6)], fp32)
    assert "pre-gate, post-gate" in compiled.report() and "circular" in compiled.report(), compiled.report()


# -- the spectral product, spelled otherwise ---------------------------------------------------
class SpelledProduct(nn.Module):
    """irfft of U times K written as an einsum or a broadcast product, a filter per output channel
    C (or one), and a skip with D (C, H) or (H,)."""

    SPELLINGS = {
        "einsum-bhl,hl": lambda x_f, k_f: torch.einsum("bhl,hl->bhl", x_f, k_f[0]),
        "einsum-chl,bhl": lambda x_f, k_f: torch.einsum("chl,bhl->bchl", k_f, x_f),
        "einsum-bhcl": lambda x_f, k_f: torch.einsum("bhl,chl->bhcl", x_f, k_f),
        "unsqueeze": lambda x_f, k_f: x_f.unsqueeze(1) * k_f,
        "none-index": lambda x_f, k_f: k_f[None] * x_f[:, None, :, :],
    }

    def __init__(self, spelling, channels, d_model, seqlen):
        super().__init__()
        self.spelling = spelling
        self.k = nn.Parameter(torch.randn(channels, d_model, seqlen) * torch.exp(-torch.arange(seqlen) / 20))
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, x):
        n = 2 * x.shape[-1]
        y_f = self.SPELLINGS[self.spelling](torch.fft.rfft(x, n=n), torch.fft.rfft(self.k, n=n))
        y = torch.fft.irfft(y_f, n=n)[..., :x.shape[-1]]
        skip = x.unsqueeze(-2) if self.spelling == "einsum-bhcl" else x.unsqueeze(-3) if y.dim() == 4 else x
        return y + skip * self.D[:, None, None] if self.spelling == "einsum-bhcl" else y + skip * self.D[:, None]


@pytest.mark.parametrize("spelling, channels", [
    ("einsum-bhl,hl", 1), ("einsum-chl,bhl", 2), ("einsum-bhcl", 3), ("unsqueeze", 2), ("none-index", 1),
])
def test_spectral_products_spelled_otherwise(spelling, channels):
    torch.manual_seed(0)
    module = SpelledProduct(spelling, channels, 4, 50)
    compiled = assert_fuses_and_matches(module, [torch.randn(2, 4, 50)], fp32)
    assert "D skip" in compiled.report(), compiled.report()

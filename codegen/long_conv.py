"""FFT long convolution (H3's FlashConv, Hyena, FlashFFTConv): spec, FFT plan and tables, filter
spectrum, launch configs, support checks and the PyTorch reference.

One Triton kernel is rendered per LongConvSpec (which of D, pre_gate, post_gate it fuses) from
codegen/templates/long_conv.py.jinja. It computes the causal convolution of each (batch, channel)
row with its channel's filter by FFT, in one pass over u, with the FFT written as small dense DFT
matrix products (FlashFFTConv's Monarch decomposition) so that it runs on tensor cores:

    N = P * M1 * M2 >= 2L points (powers of two; M1, M2 in 16..64, P in 1..32)
    x = v[b0] + i v[b1]                 two batch rows of one channel as one complex row, v = u * pre_gate
    X = DFT_N(x), the four-step way:    P-point DFTs down columns, twiddles, M-point row FFTs
        M-point row FFT:                DFT_M1 @ row[M1, M2], twiddles, @ DFT_M2  (tl.dot, re/im apart)
    Y = iDFT_N(X * k_f)                 the same steps transposed and conjugated
    y[b0] = Re Y[:L], y[b1] = Im Y[:L]  the filter is real, so its convolution keeps the rows apart
    out = (y + D * v) * post_gate

k_f = filter_spectrum(k, L, scale) holds DFT_N(k) * scale / N with its bins in the kernel's order;
it is computed once per call and shared by every batch row: by torch.fft here, or by the generated
module's spectrum kernel (the convolution's forward half on the filter alone, one launch). A plan
with P = 1 keeps the whole row in registers; P > 1 passes the columns through a per-program scratch
buffer.

This module does not import triton: loading a generated module does, after runtime.interpret
has chosen between compiled kernels and the interpreter.
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from codegen.launching import persistent
from codegen.render import render
from ir.limits import KERNEL_DTYPES

MIN_FFT = 256  # 16 x 16: the smallest tile pair tl.dot takes
MAX_FFT_ROWS = 32  # P
MAX_FFT_COLS = 4096  # M = M1 * M2 <= 64 x 64, one row in registers
MAX_SEQLEN = MAX_FFT_ROWS * MAX_FFT_COLS // 2
# Scratch of persistent programs: small enough to stay in an H100's 50 MB L2 (each program
# rewrites its own region for every row pair), yet at least two programs per SM of 132.
SCRATCH_L2_BYTES = 24 * 1024 * 1024
MIN_PERSISTENT_PROGRAMS = 264
# fp16 keeps as many mantissa bits as tf32: one tf32 rounding per DFT stage would cost more than
# the output's own fp16 rounding, so fp16 uses 3xTF32; bf16 has 3 bits fewer and tf32 suffices.
DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}
# The filter's spectrum (the module's spectrum kernel) keeps fp32 accuracy, on tensor cores (3xTF32)
# for 16-bit convolutions: one transform per channel, shared by the batch, so it costs little.
SPECTRUM_PRECISION = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32x3"}


@dataclass(frozen=True)
class LongConvSpec:
    """Which optional operands one rendered kernel fuses; everything else is a launch argument."""

    has_D: bool = False
    has_pre_gate: bool = False
    has_post_gate: bool = False

    @classmethod
    def for_args(cls, D=None, pre_gate=None, post_gate=None) -> LongConvSpec:
        """The spec a long_conv_reference call with these arguments needs."""
        return cls(has_D=D is not None, has_pre_gate=pre_gate is not None, has_post_gate=post_gate is not None)


@dataclass(frozen=True)
class FFTPlan:
    """N = rows * m1 * m2 points: `rows`-point DFTs down the columns of a (rows, M) matrix, then
    M = m1 * m2-point FFTs along its rows, each as DFT_m1 @ row[m1, m2] @ DFT_m2 with twiddles."""

    rows: int
    m1: int
    m2: int

    @property
    def cols(self) -> int:
        return self.m1 * self.m2

    @property
    def n(self) -> int:
        return self.rows * self.cols


def kernel_name(spec: LongConvSpec) -> str:
    """e.g. long_conv, long_conv_D_pre_gate_post_gate: the family, then every fused operand."""
    return "_".join(["long_conv", *(f.name.removeprefix("has_") for f in fields(spec) if getattr(spec, f.name))])


def render_long_conv(spec: LongConvSpec) -> str:
    """Python source of a module holding the kernel for `spec` and its `launch`."""
    return render("long_conv.py.jinja", name=kernel_name(spec), spec=spec,
                  shapes_doc=inspect.getdoc(long_conv_reference))


def require_spec(rendered: LongConvSpec, requested: LongConvSpec) -> None:
    """Raise when a launcher is called with optional operands its source was not rendered for."""
    if rendered != requested:
        raise ValueError(f"flashfx: kernel rendered for {rendered} called with operands needing {requested}")


# -- the FFT plan and its constant tables ----------------------------------------------------


def fft_size(seqlen: int) -> int:
    """N: the power of two >= 2L (and >= MIN_FFT), so that the circular convolution is linear."""
    return max(MIN_FFT, 1 << max(2 * seqlen - 1, 1).bit_length())


def fft_plan(seqlen: int, max_cols: int = MAX_FFT_COLS) -> FFTPlan:
    """The split of fft_size(seqlen): the longest row M <= max_cols, then M1 >= M2."""
    n = fft_size(seqlen)
    cols = min(n, max_cols)
    m1 = 1 << (cols.bit_length() // 2)
    plan = FFTPlan(rows=n // cols, m1=m1, m2=cols // m1)
    if plan.rows > MAX_FFT_ROWS or min(plan.m1, plan.m2) < 16 or max(plan.m1, plan.m2) > 64:
        raise ValueError(f"flashfx: no FFT plan for seqlen {seqlen} with rows of at most {max_cols} points")
    return plan


def plan_of(k_f: torch.Tensor, seqlen: int) -> FFTPlan:
    """The plan a spectrum from filter_spectrum was laid out for; checks it covers `seqlen`."""
    if k_f.dim() != 5 or k_f.shape[1] != 2 or k_f.dtype != torch.float32 or not k_f.is_contiguous():
        raise ValueError(f"flashfx: k_f must come from filter_spectrum, got {k_f.dtype} {tuple(k_f.shape)}")
    plan = FFTPlan(*k_f.shape[2:])
    if 2 * seqlen > plan.n:
        raise ValueError(f"flashfx: a {plan.n}-point spectrum cannot convolve {seqlen} steps (needs >= {2 * seqlen})")
    return plan


def _roots(rows: int, cols: int, n: int) -> torch.Tensor:
    """(2, rows, cols) fp32: real and imaginary planes of W_n^(j k) = exp(-2 pi i (j k mod n) / n)."""
    j = torch.arange(rows, dtype=torch.int64)[:, None]
    k = torch.arange(cols, dtype=torch.int64)[None, :]
    angle = (j * k % n).double() * (-2 * math.pi / n)
    return torch.stack([angle.cos(), angle.sin()]).float()


@lru_cache(maxsize=None)
def fft_tables(plan: FFTPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(DFT_m1, DFT_m2, twiddles W_M^(a n2) (m1, m2), DFT_rows, twiddles W_N^(k1 m) (rows, M)), each
    as (2, r, c) fp32 planes on `device`; built in fp64 once per plan and device (`persistent`)."""
    return persistent(_tables, plan, device)


def _tables(plan: FFTPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(_roots(*shape).to(device) for shape in (
        (plan.m1, plan.m1, plan.m1), (plan.m2, plan.m2, plan.m2), (plan.m1, plan.m2, plan.cols),
        (plan.rows, plan.rows, plan.rows), (plan.rows, plan.cols, plan.n)))


def filter_spectrum(k: torch.Tensor, seqlen: int, *, scale: float = 1.0, max_cols: int = MAX_FFT_COLS,
                    circular: bool = False) -> torch.Tensor:
    """The spectrum launch multiplies by: DFT_N(k) * scale / N of the zero-padded filter k (H, Lk),
    as fp32 (H, 2, P, M1, M2) planes where [h, :, k1, a, b] holds bin k1 + P (a + M1 b).
    With `circular`, k (H, p) is the filter of a circular convolution of period p >= L (see
    wrapped_filter).

    One FFT per channel, shared by every batch row; computed in float32 (float64 for float64 k).
    max_cols caps the in-register row M (tests use short rows to reach large P cheaply).
    """
    plan = fft_plan(seqlen, max_cols)
    k = wrapped_filter(k, seqlen, plan.n) if circular else k
    spectrum = torch.fft.fft(k.to(torch.promote_types(k.dtype, torch.float32)), n=plan.n, norm="forward")
    if scale != 1.0:
        spectrum = spectrum * scale
    planes = torch.view_as_real(spectrum).view(k.shape[0], plan.m2, plan.m1, plan.rows, 2).permute(0, 4, 3, 2, 1)
    if planes.dtype == torch.float32:
        return planes.contiguous()
    return planes.to(torch.float32, memory_format=torch.contiguous_format)


def wrapped_filter(k: torch.Tensor, seqlen: int, n: int) -> torch.Tensor:
    """The filter of period n >= 2L - 1 that convolves L steps as the filter k (H, p) of period p does.

    Output t < L reads input s < L through tap (t - s) mod p, an offset d = t - s in -(L-1)..L-1:
    d >= 0 is the causal part, d < 0 the anti-causal one (a bidirectional filter). Period n keeps
    every offset apart, at d mod n: a linear two-sided convolution once u is zero-padded to n.
    """
    offsets = torch.arange(1 - seqlen, seqlen, device=k.device)
    wrapped = k.new_zeros(*k.shape[:-1], n)
    wrapped[..., offsets % n] = k[..., offsets % k.shape[-1]]
    return wrapped


def program_count(plan: FFTPlan, n_pairs: int) -> int:
    """Programs to launch: one per row pair when the row fits in registers; otherwise persistent
    programs looping over row pairs, as many as SCRATCH_L2_BYTES of scratch holds but at least
    MIN_PERSISTENT_PROGRAMS."""
    if plan.rows == 1:
        return n_pairs
    return min(n_pairs, max(MIN_PERSISTENT_PROGRAMS, SCRATCH_L2_BYTES // (2 * plan.n * 4)))


def scratch_buffer(plan: FFTPlan, programs: int, device: torch.device) -> torch.Tensor:
    """Each program's (2, P, M) fp32 planes for its current row pair's columns (P > 1; with P == 1
    the row stays in registers)."""
    return torch.empty(programs * 2 * plan.n, dtype=torch.float32, device=device)


# -- launch configurations -------------------------------------------------------------------


CONFIG_KEYS = ("BLOCK_COLS", "num_warps", "num_stages")  # what default_config and config_space set


def default_config(plan: FFTPlan) -> dict:
    """BLOCK_COLS columns per step of the P-point column DFTs (about 4096 elements a tile);
    8 warps for rows of 512 points and more. Compiled for sm_90, 4 warps take all 255 registers
    from 512 points on, and a 64 x 64 row spills even with 8."""
    return {"BLOCK_COLS": max(16, min(plan.cols, 4096 // plan.rows)),
            "num_warps": 8 if plan.cols >= 512 else 4, "num_stages": 1}


def config_space(plan: FFTPlan) -> list[dict]:
    """Autotuning candidates: BLOCK_COLS (only matters when P > 1) x warps {4, 8, 16} x stages {1, 2}."""
    widths = sorted({min(plan.cols, max(16, elements // plan.rows)) for elements in (2048, 4096, 8192)})
    if plan.rows == 1:
        widths = widths[:1]
    return [{"BLOCK_COLS": width, "num_warps": warps, "num_stages": stages}
            for width, warps, stages in itertools.product(widths, (4, 8, 16), (1, 2))]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for the DFT products, by u's dtype (see DOT_PRECISION)."""
    return DOT_PRECISION[dtype]


# -- support checks --------------------------------------------------------------------------


def unsupported_reason(u, k, D=None, pre_gate=None, post_gate=None, out=None, circular=False) -> str | None:
    """Why the kernel cannot run this long_conv_reference call, in words for report(); None when it can."""
    given = {name: t for name, t in dict(u=u, k=k, D=D, pre_gate=pre_gate, post_gate=post_gate, out=out).items()
             if t is not None}
    reason = _device_reason(given) or _dtype_reason(given)
    if reason:
        return reason
    for name, rank in dict(u=3, k=2, D=1, pre_gate=3, post_gate=3, out=3).items():
        if name in given and given[name].dim() != rank:
            return f"{name} must have {rank} dimensions, got shape {tuple(given[name].shape)}"
    batch, channels, seqlen = u.shape
    expected = dict(D=(channels,), pre_gate=tuple(u.shape), post_gate=tuple(u.shape), out=tuple(u.shape))
    for name, shape in expected.items():
        if name in given and tuple(given[name].shape) != shape:
            return f"{name} has shape {tuple(given[name].shape)}, expected {shape}"
    return _size_reason(batch, channels, seqlen, k, circular)


def _device_reason(tensors: dict[str, torch.Tensor]) -> str | None:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        return "operands are on different devices (" + ", ".join(f"{n} on {t.device}" for n, t in tensors.items()) + ")"
    device = devices.pop()
    if device.type not in ("cuda", "cpu"):
        return f"device {device} is neither CUDA nor the CPU (Triton's interpreter)"
    return None


def _dtype_reason(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        allowed = KERNEL_DTYPES + (torch.float64,) if name in ("k", "D") else KERNEL_DTYPES
        if t.dtype not in allowed:
            return f"{name} has dtype {t.dtype}; the kernel takes float32, float16 or bfloat16 (real only)"
    return None


def _size_reason(batch: int, channels: int, seqlen: int, k: torch.Tensor, circular: bool) -> str | None:
    if min(batch, channels, seqlen, k.shape[1]) == 0:
        return "empty tensors (a zero-sized batch, channel or time axis, or an empty filter)"
    if k.shape[0] != channels:
        return f"k has {k.shape[0]} channels, u has {channels}"
    if circular and k.shape[1] < seqlen:
        return f"a circular filter of period {k.shape[1]} < L = {seqlen}: its transform would crop the signal"
    if k.shape[1] > seqlen and not circular:
        return (f"the filter ({k.shape[1]} taps) is longer than the sequence ({seqlen}): rfft(k, n=2L) "
                f"would wrap its tail around, which the kernel does not reproduce")
    if seqlen > MAX_SEQLEN:
        return (f"sequence length {seqlen} > {MAX_SEQLEN}: the FFT would need more than {MAX_FFT_ROWS} rows "
                f"of {MAX_FFT_COLS} points")
    return None


# -- reference -------------------------------------------------------------------------------


def long_conv_reference(
    u: torch.Tensor,
    k: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    pre_gate: torch.Tensor | None = None,
    post_gate: torch.Tensor | None = None,
    scale: float = 1.0,
    circular: bool = False,
) -> torch.Tensor:
    """out = post_gate * (scale * causal_conv(v, k) + D * v) with v = pre_gate * u, per batch and channel.

    long_conv_reference computes it with torch.fft the way H3 and Hyena write it; launch runs the
    fused kernel of one LongConvSpec (which fixes which of D, pre_gate, post_gate it takes) on the
    filter's spectrum k_f = filter_spectrum(k, L, scale=scale), into out.

        u          (batch, channels, L)      any strides
        k          (channels, Lk), Lk <= L   the filter; launch takes k_f (channels, 2, P, M1, M2) fp32
        D          (channels,)               skip weight, or None
        pre_gate   (batch, channels, L)      multiplied into u first, or None
        post_gate  (batch, channels, L)      multiplied into the result last, or None
        out        (batch, channels, L)      launch: preallocated, any float dtype

    causal_conv(v, k)[t] = sum_{s <= t} k[t - s] v[s] = irfft(rfft(v, n=2L) * rfft(k, n=2L), n=2L)[t]
    for t < L. With `circular`, k (channels, p), p >= L, is the filter of a circular convolution of
    period p instead: sum_{s < L} k[(t - s) mod p] v[s] (n = p above; a bidirectional filter).
    Computes in float32 (float64 for float64 inputs) and returns u's dtype.
    """
    seqlen = u.shape[-1]
    n = k.shape[-1] if circular else 2 * seqlen
    compute = torch.promote_types(u.dtype, torch.float32)
    v = u.to(compute) if pre_gate is None else u.to(compute) * pre_gate.to(compute)
    k_f = torch.fft.rfft(k.to(compute), n=n)
    v_f = torch.fft.rfft(v, n=n)
    y = torch.fft.irfft(v_f * k_f, n=n)[..., :seqlen] * scale
    if D is not None:
        y = y + v * D.to(compute)[:, None]
    if post_gate is not None:
        y = y * post_gate.to(compute)
    return y.to(u.dtype)

"""Mamba-2's state-space dual (SSD) scan: specs, rendering, configs, support checks, references.

Two templates, each beside its PyTorch reference here (same shape table):

  ssd_scan.py.jinja           ssd_scan_reference: the whole sequence, chunked (four kernels)
  ssd_state_update.py.jinja   ssd_state_update_reference: one decoding step from a carried state

Per head h (a scalar decay), with Δ = clamp(softplus(dt + dt_bias), dt_min, dt_max) and
a_t = Δ_t A_t, the scan computes S_t = exp(a_t) S_{t-1} + Δ_t x_t ⊗ B_t, y_t = S_t C_t + D x_t,
out = y * silu(z). The chunked kernels (chunks of CHUNK steps; Dao & Gu's SSD algorithm, the
five-kernel structure of mamba_ssm with C B^T fused into the chunk scan):

    chunk_cumsum   Δ, and cs = cumsum within the chunk of a * log2(e)       (b, h, chunks, CHUNK) fp32
    chunk_state    end-of-chunk states from the chunk alone:
                   s_c = Σ_t (x_t Δ_t 2^(cs_last - cs_t)) ⊗ B_t       tl.dot   (b, chunks, h, p, n) fp32
    state_passing  start-of-chunk states, in place:  S = S0; for c: (s_c, S) <- (S, 2^cs_last S + s_c)
    chunk_scan     y_m = 2^cs_m C_m S_c^T + Σ_{k<=m} (C_m·B_k) 2^(cs_m - cs_k) Δ_k x_k      tl.dot
                   + D x_m, times silu(z_m)

Only the chunk-boundary states (n / CHUNK of x's size per head dim, in fp32) and two fp32
vectors per step go through memory; the (L, L) decay mask and the per-step states never exist.
Dots of two inputs (C B^T) run in the input dtype with fp32 accumulation; dots with a computed
fp32 operand run in full fp32 for fp32 inputs, 3xTF32 for 16-bit inputs read out in fp32, TF32
for a 16-bit output (dot_precision).

This module does not import triton: loading a generated module does (see runtime.interpret).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from codegen.render import render
from codegen.ssm_scan import (
    device_reason, dtype_reason, flag_name, given_tensors, rank_reason, shape_reason, template_flags, with_shapes,
    require_spec)
from ir.limits import MAX_GRID_YZ

SCAN_SHAPES = """Shapes (b batch, L seqlen, h heads, p head dim, n dstate, g groups of heads sharing B and C):
    x           (b, L, h, p)     input
    dt          (b, L, h)        step size Δ, before dt_bias, softplus and the limits
    A           (b, L, h)        decay rate (per head, negative; usually A_h expanded along b and L)
    B, C        (b, L, g, n)     input and output projections; head i reads group i // (h // g)
    D           (h, p)           skip: y += D * x (usually D_h expanded along p)
    z           (b, L, h, p)     gate: out = y * silu(z)
    dt_bias     (h,)             added to dt before the softplus
    initial_state, final_state  (b, h, p, n)   S_{-1} and S_{L-1}
    out         (b, L, h, p)"""

STATE_UPDATE_SHAPES = """Shapes (b batch, h heads, p head dim, n dstate, g groups of heads sharing B and C):
    state       (b, h, p, n)     S_{t-1}
    x           (b, h, p)        input x_t
    dt          (b, h)           step size Δ_t, before dt_bias, softplus and the limits
    A           (b, h)           decay rate (usually A_h expanded along b)
    B, C        (b, g, n)        input and output projections; head i reads group i // (h // g)
    D           (h, p)           skip: y += D * x
    z           (b, h, p)        gate: out = y * silu(z)
    dt_bias     (h,)             added to dt before the softplus
    new_state   (b, h, p, n)     S_t (may be state itself: updated in place)
    out         (b, h, p)"""

MAX_DSTATE = 256
MAX_HEADDIM = 256
MIN_DOT = 16  # tl.dot's smallest tile side


@dataclass(frozen=True)
class SSDSpec:
    """What a chunked-SSD kernel fuses; one rendered source per distinct spec."""

    has_D: bool = False
    has_z: bool = False
    has_dt_bias: bool = False
    dt_softplus: bool = False
    dt_limit: bool = False
    has_initial_state: bool = False
    return_final_state: bool = False

    @classmethod
    def for_args(cls, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None, initial_state=None,
                 final_state=None) -> SSDSpec:
        return cls(has_D=D is not None, has_z=z is not None, has_dt_bias=dt_bias is not None,
                   dt_softplus=bool(dt_softplus), dt_limit=dt_limit is not None,
                   has_initial_state=initial_state is not None, return_final_state=final_state is not None)


@dataclass(frozen=True)
class SSDStateUpdateSpec:
    """What an SSD decode-step kernel fuses."""

    has_D: bool = False
    has_z: bool = False
    has_dt_bias: bool = False
    dt_softplus: bool = False
    dt_limit: bool = False

    @classmethod
    def for_args(cls, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None) -> SSDStateUpdateSpec:
        return cls(has_D=D is not None, has_z=z is not None, has_dt_bias=dt_bias is not None,
                   dt_softplus=bool(dt_softplus), dt_limit=dt_limit is not None)


def kernel_name(spec: SSDSpec | SSDStateUpdateSpec) -> str:
    """e.g. ssd_scan_D_dt_bias_dt_softplus_final_state: the family, then every fused feature."""
    family = "ssd_scan" if isinstance(spec, SSDSpec) else "ssd_state_update"
    flags = [flag_name(f.name) for f in fields(spec) if getattr(spec, f.name)]
    return "_".join([family, *flags])


def render_scan(spec: SSDSpec) -> str:
    """Triton source of the chunked SSD scan for `spec`."""
    return render("ssd_scan.py.jinja", name=kernel_name(spec), spec=repr(spec), shapes=SCAN_SHAPES,
                  **template_flags(spec))


def render_state_update(spec: SSDStateUpdateSpec) -> str:
    """Triton source of the SSD decode step for `spec`."""
    return render("ssd_state_update.py.jinja", name=kernel_name(spec), spec=repr(spec),
                  shapes=STATE_UPDATE_SHAPES, **template_flags(spec))


# -- launch configs ------------------------------------------------------------------------------
CONFIG_KEYS = ("CHUNK", "BLOCK_M", "BLOCK_K", "BLOCK_P", "num_warps")
STATE_UPDATE_CONFIG_KEYS = ("BLOCK_P", "num_warps")


def block(size: int, smallest: int = MIN_DOT) -> int:
    """The power-of-two tile that covers `size`, at least `smallest`."""
    return max(smallest, 1 << max(size - 1, 0).bit_length())


def dot_precision(input_dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """tl.dot's input precision for the products with a computed fp32 operand: full fp32 for fp32
    inputs (as PyTorch computes), TF32 when the output is 16-bit (its rounding dominates), 3xTF32 for
    16-bit inputs read out in fp32 (Hugging Face's Mamba-2 path upcasts and computes in fp32)."""
    if input_dtype == torch.float32:
        return "ieee"
    return "tf32x3" if out_dtype == torch.float32 else "tf32"


def default_config(spec, *, seqlen: int = 1, headdim: int, dstate: int, itemsize: int = 2) -> dict:
    """A first guess before autotuning, checked with ptxas for an H100 (no spills; see
    tests/codegen/cuda_compile_grid.py). Scan: chunks of 256 steps (fewer for short sequences);
    16-bit inputs 64 x 64 tiles of (steps, head dim) with 4 warps, steps in blocks of 32 and 8
    warps past 128 states; fp32 inputs (no tensor cores) 32 x 32 tiles. Decode step: the head dim
    in one tile of up to 2048 state elements."""
    if isinstance(spec, SSDStateUpdateSpec):
        block_p = min(block(headdim, 1), max(2048 // block(dstate), 1))
        return {"BLOCK_P": block_p, "num_warps": min(max(block_p * block(dstate) // 512, 1), 8)}
    chunk = min(256, block(seqlen))
    if itemsize >= 4:
        rows = steps = columns = 32
        warps = 4
    else:
        rows, steps, columns = 64, (64 if dstate <= 128 else 32), 64
        warps = 4 if dstate <= 128 else 8
    return {"CHUNK": chunk, "BLOCK_M": min(rows, chunk), "BLOCK_K": min(steps, chunk),
            "BLOCK_P": min(columns, block(headdim)), "num_warps": warps}


def config_space(spec, *, seqlen: int = 1, headdim: int, dstate: int) -> list[dict]:
    """Candidates for the autotuner: chunks of 64..256 steps (not longer than the sequence needs),
    row and step tiles that divide the chunk, head-dim tiles up to the head dim."""
    if isinstance(spec, SSDStateUpdateSpec):
        return [{"BLOCK_P": p, "num_warps": w} for p, w in itertools.product((4, 8, 16, 32, 64), (1, 2, 4, 8))
                if p <= block(headdim, 1) and 1 <= p * block(dstate) // (32 * w) <= 64]
    longest = min(256, block(seqlen))
    return [{"CHUNK": chunk, "BLOCK_M": m, "BLOCK_K": k, "BLOCK_P": p, "num_warps": w}
            for chunk, m, k, p, w in itertools.product((64, 128, 256), (32, 64, 128), (32, 64), (32, 64, 128), (4, 8))
            if chunk <= max(longest, 64) and m <= chunk and k <= chunk and p <= block(headdim)
            and m * block(dstate) * 4 <= 64 * 1024]


# -- support checks ------------------------------------------------------------------------------
def unsupported_reason(x, dt, A, B, C, out, D=None, z=None, dt_bias=None, initial_state=None,
                       final_state=None) -> str | None:
    """Why the chunked kernels cannot run this ssd_scan_reference call, or None when they can."""
    given = given_tensors(x=x, dt=dt, A=A, B=B, C=C, out=out, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state,
                   final_state=final_state)
    reason = (device_reason(given) or dtype_reason(given)
              or rank_reason(given, x=4, dt=3, A=3, B=4, C=4, out=4, D=2, z=4, dt_bias=1, initial_state=4,
                              final_state=4))
    if reason:
        return reason
    batch, seqlen, heads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    state = (batch, heads, headdim, dstate)
    expected = dict(dt=(batch, seqlen, heads), A=(batch, seqlen, heads), B=(batch, seqlen, groups, dstate),
                    C=(batch, seqlen, groups, dstate), out=x.shape, D=(heads, headdim), z=x.shape,
                    dt_bias=(heads,), initial_state=state, final_state=state)
    return shape_reason(given, expected) or _size_reason(batch, heads, headdim, dstate, groups, seqlen)


def state_update_unsupported_reason(state, x, dt, A, B, C, new_state, out, D=None, z=None,
                                    dt_bias=None) -> str | None:
    """Why the decode-step kernel cannot run this ssd_state_update_reference call, or None."""
    given = given_tensors(state=state, x=x, dt=dt, A=A, B=B, C=C, new_state=new_state, out=out, D=D, z=z, dt_bias=dt_bias)
    reason = (device_reason(given) or dtype_reason(given)
              or rank_reason(given, state=4, x=3, dt=2, A=2, B=3, C=3, new_state=4, out=3, D=2, z=3, dt_bias=1))
    if reason:
        return reason
    batch, heads, headdim, dstate = state.shape
    groups = B.shape[1]
    expected = dict(x=(batch, heads, headdim), dt=(batch, heads), A=(batch, heads), B=(batch, groups, dstate),
                    C=(batch, groups, dstate), new_state=state.shape, out=x.shape, D=(heads, headdim), z=x.shape,
                    dt_bias=(heads,))
    return shape_reason(given, expected) or _size_reason(batch, heads, headdim, dstate, groups, seqlen=1)


def _size_reason(batch: int, heads: int, headdim: int, dstate: int, groups: int, seqlen: int) -> str | None:
    if min(batch, heads, headdim, dstate, groups, seqlen) == 0:
        return "empty tensors (a zero-sized batch, head, head dim, state, group or time axis)"
    if heads % groups:
        return f"{heads} heads are not a multiple of the {groups} groups of B and C"
    if dstate > MAX_DSTATE or headdim > MAX_HEADDIM:
        return f"dstate {dstate} or head dim {headdim} exceeds {MAX_DSTATE}: a state row must fit in registers"
    if batch * heads > MAX_GRID_YZ:
        return f"batch x heads = {batch * heads} exceeds the launch grid's limit of {MAX_GRID_YZ}"
    return None


# -- PyTorch references --------------------------------------------------------------------------
def _compute_dtype(*tensors) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def step_sizes(dt, dt_bias=None, dt_softplus=False, dt_limit=None):
    """Δ = clamp(softplus(dt + dt_bias), *dt_limit), each part optional; dt_bias broadcasts on the last dim."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None:
        dt = dt.clamp(*dt_limit)
    return dt


def _per_head(BC: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """B or C with its group axis `dim` repeated so that head i reads group i // (heads // groups)."""
    return BC.repeat_interleave(heads // BC.shape[dim], dim=dim)


@with_shapes(SCAN_SHAPES)
def ssd_scan_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                       initial_state=None, chunk: int = 64, chunk_states: bool = False):
    """(out, final_state) of the SSD scan in PyTorch, chunked as the kernels are (so that autograd
    through it, the op's backward, costs a few dozen ops at any L), in float32 (float64 when an
    input is float64). dt_limit: (min, max) or None. chunk_states: also return the state entering
    each chunk of `chunk` steps, (b, chunks, h, p, n), as a training forward saves them."""
    compute = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    x, dt, A, B, C = (t.to(compute) for t in (x, dt, A, B, C))
    delta = step_sizes(dt, dt_bias, dt_softplus, dt_limit)
    batch, seqlen, heads, headdim = x.shape
    pad = -seqlen % chunk
    X, a, B, C = (_chunked(t, pad, chunk) for t in (x * delta[..., None], delta * A, _per_head(B, heads, 2),
                                                    _per_head(C, heads, 2)))
    cs = torch.cumsum(a, dim=2)  # (b, c, t, h)
    scores = torch.einsum("bclhn,bcshn->bchls", C, B) * _decay(a.permute(0, 1, 3, 2))
    y = torch.einsum("bchls,bcshp->bclhp", scores, X)
    states = torch.einsum("bclhn,bclh,bclhp->bchpn", B, torch.exp(cs[:, :, -1:] - cs), X)
    start = x.new_zeros(batch, 1, heads, headdim, B.shape[-1]) if initial_state is None else \
        initial_state.to(compute)[:, None]
    passing = _decay(F.pad(cs[:, :, -1], (0, 0, 1, 0)).transpose(1, 2))  # (b, h, z, c)
    boundaries = torch.einsum("bhzc,bchpn->bzhpn", passing, torch.cat([start, states], dim=1))
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", C, boundaries[:, :-1], torch.exp(cs))
    out = y.reshape(batch, -1, heads, headdim)[:, :seqlen]
    out = _epilogue(out, x, D, z, compute)
    return (out, boundaries[:, -1], boundaries[:, :-1]) if chunk_states else (out, boundaries[:, -1])


def _decay(a: torch.Tensor) -> torch.Tensor:
    """exp(a[..., j+1] + ... + a[..., i]) at [..., i, j] for j <= i, 0 above: differences of running sums,
    as the kernels take them (codegen imports nothing from ir, so runtime and codegen stand alone)."""
    sums = torch.cumsum(a, dim=-1)
    size = a.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=a.device).tril()
    return torch.exp((sums[..., :, None] - sums[..., None, :]).masked_fill(~causal, -torch.inf))


def _chunked(t: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """(b, L, ...) padded with zero steps and cut into (b, chunks, chunk, ...)."""
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


@with_shapes(STATE_UPDATE_SHAPES)
def ssd_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               dt_limit=None):
    """(out, new_state) of one decoding step in PyTorch, in float32 (float64 when an input is float64);
    `state` is left unchanged."""
    compute = _compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    state, x, dt, A, B, C = (t.to(compute) for t in (state, x, dt, A, B, C))
    delta = step_sizes(dt, dt_bias, dt_softplus, dt_limit)
    heads = x.shape[1]
    B, C = _per_head(B, heads, 1), _per_head(C, heads, 1)
    new_state = torch.exp(delta * A)[..., None, None] * state + (delta[..., None] * x)[..., None] * B[:, :, None]
    out = torch.einsum("bhpn,bhn->bhp", new_state, C)
    return _epilogue(out, x, D, z, compute), new_state


def _epilogue(y, x, D, z, compute):
    if D is not None:
        y = y + x * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y


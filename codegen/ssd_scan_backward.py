"""Mamba-2 SSD scan backward (training): rendering, configs, saved chunk length, reference.

The template ssd_scan_backward.py.jinja differentiates the chunked forward of ssd_scan.py.jinja for
one forward SSDSpec. A training forward saves the state entering each chunk of saved_chunk(L)
steps, S_c (b, chunks, h, p, n) in float32: n * 4 / CHUNK bytes per element of x (one bf16 copy
of x at Mamba-2's n = 128, CHUNK = 256), which spares the backward a pass over x and B and the
serial state passing. The backward reruns the cheap chunk cumsum (Δ, cs) and never holds more
than one (CHUNK x CHUNK) tile of a chunk's decay matrix:

    per chunk c, with a = Δ A, cs its running sum in the chunk, X = Δ x, dy = dout * silu(z):
    _chunk_dstates      ds_c = Σ_m e^cs_m dy_m ⊗ C_m                                      tl.dot
    _state_passing_bwd  from the last chunk: G_c = dS_{c+1} (dfinal_state last);
                        G_{c-1} = e^cs_last G_c + ds_c;  σ_c = e^cs_last <G_c, S_c>;  d initial = G_{-1}
    _chunk_bwd_dc       rows m: dC_m = e^cs_m S_c^T dy_m + Σ_{k<=m} e^(cs_m - cs_k) (dy_m·X_k) B_k      tl.dot
                        u_m = e^cs_m dy_m·(S_c C_m);  y for dz;  the intra-chunk straddle sums below
    _chunk_bwd_dx       rows k: dX_k = e^(cs_last - cs_k) G B_k + Σ_{m>=k} (C_m·B_k) e^(cs_m - cs_k) dy_m  tl.dot
                        dB_k = e^(cs_last - cs_k) G^T X_k + Σ_{m>=k} e^(cs_m - cs_k) (dy_m·X_k) C_m
                        dx = Δ dX + D dy;  v_k = X_k·(e^(cs_last - cs_k) G B_k);  x_k·dX_k
    _chunk_cumsum_bwd   da_t = Σ_{m>=t} u_m + σ_c + Σ_{k<t} v_k + Σ_{m>=t>k} W_mk,
                        W_mk = (C_m·B_k) e^(cs_m - cs_k) (dy_m·X_k);  dA = Δ da;
                        ddt = (x·dX + A da) softplus'(dt + dt_bias) [lo <= Δ <= hi]

da_t, the gradient of a_t, is each term's exact dependence on a_t (no difference of running sums,
so no cancellation). dB, dC (per group: summed over a program's heads in registers, over head
splits by torch.sum), dD (over batch and row blocks), d dt_bias (over batch and chunks) and the
straddle sums (over row blocks) are float32 partials added by torch.sum: deterministic, no atomics.
`ssd_scan_backward_reference` is the same math by autograd through the forward's reference.
"""
from __future__ import annotations

import itertools

import torch

from codegen import ssd_scan
from codegen.render import render
from codegen.ssd_scan import SSDSpec, block, ssd_scan_reference, template_flags, with_shapes

BACKWARD_SHAPES = ssd_scan.SCAN_SHAPES + """
    dout         (b, L, h, p)       gradient of out
    dfinal_state (b, h, p, n)       gradient of final_state (when the forward returned it)
    chunk_states (b, chunks, h, p, n) float32   the state entering each chunk (the forward saved it)
    dx, dz       like x, z          written in their tensors' dtypes
    dt, A, B, C, D, dt_bias, initial_state      float32 gradients, shaped as the kernels take them"""

BACKWARD_CONFIG_KEYS = ("BLOCK_M", "BLOCK_K", "BLOCK_P", "HEADS", "num_warps", "num_stages")
MAX_STATE_TILE = 64 * 1024  # bytes of the float32 (p, n) state tile the backward's row kernels hold
LONGEST_CHUNK = 256
TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs: split a group's heads until the grid has this many


def saved_chunk(seqlen: int) -> int:
    """The chunk length of a training forward's saved states, which its backward reads: the
    default forward's (256 steps, fewer for a shorter sequence), never tuned, so that the fake
    kernel knows the saved shape."""
    return min(LONGEST_CHUNK, block(seqlen))


def backward_kernel_name(spec: SSDSpec) -> str:
    """e.g. ssd_scan_backward_D_z_dt_bias_dt_softplus: the forward's name with `_backward` after the family."""
    return ssd_scan.kernel_name(spec).replace("ssd_scan", "ssd_scan_backward", 1)


def render_scan_backward(spec: SSDSpec) -> str:
    """Triton source of the SSD scan backward for the forward `spec`."""
    return render("ssd_scan_backward.py.jinja", name=backward_kernel_name(spec), spec=repr(spec),
                  shapes=BACKWARD_SHAPES, **template_flags(spec))


def backward_dot_precisions(input_dtype: torch.dtype) -> dict[str, str]:
    """tl.dot's input precision for the dots with a computed fp32 operand: full fp32 for fp32 inputs.
    For 16-bit ones, DOT_PRECISION 3xTF32 where the result reaches da, ddt, dx or the state
    gradients (dA, dD and d dt_bias are float32 parameters in mixed precision: TF32's 10-bit
    mantissa would cost them fp32 accuracy), BCZ_PRECISION TF32 for the dots that reach only dB,
    dC and dz, gradients of 16-bit activations (and half the registers of 3xTF32)."""
    if input_dtype == torch.float32:
        return {"DOT_PRECISION": "ieee", "BCZ_PRECISION": "ieee"}
    return {"DOT_PRECISION": "tf32x3", "BCZ_PRECISION": "tf32"}


def backward_default_config(*, batch: int, seqlen: int, heads: int, groups: int, headdim: int, dstate: int,
                            itemsize: int = 2, chunk: int | None = None) -> dict:
    """A first guess, checked with ptxas for an H100 (tests/codegen/cuda_compile_grid.py): the row
    kernels hold a [BLOCK_M, head dim] and a [BLOCK_M, dstate] fp32 accumulator, the [head dim,
    dstate] fp32 state tile and, for 16-bit inputs, its 3xTF32 parts, so 16 rows on 8 warps and no
    software pipelining (a second stage spills); steps streamed in blocks of 32 for 16-bit inputs,
    16 for fp32 and past 64 x 128 state tiles; a group's heads split across programs until the grid
    has TARGET_PROGRAMS."""
    chunk = chunk or saved_chunk(seqlen)
    wide = block(headdim) * block(dstate) > 64 * 128
    rows, steps = min(16, chunk), min(16 if itemsize >= 4 or wide else 32, chunk)
    per_group = heads // groups
    programs = (chunk // rows) * -(-seqlen // chunk) * batch * groups
    splits = min(per_group, -(-TARGET_PROGRAMS // programs))
    return {"BLOCK_M": rows, "BLOCK_K": steps, "BLOCK_P": min(64, block(headdim)), "HEADS": -(-per_group // splits),
            "num_warps": 8, "num_stages": 1}


def backward_config_space(*, seqlen: int, heads: int, groups: int, headdim: int, dstate: int,
                          chunk: int | None = None) -> list[dict]:
    """Candidates: row and step tiles of 16..64 within the chunk (the row kernels' registers grow
    with BLOCK_M x (head dim + dstate)), a group's heads in 1, 2, 4 or all per program, 1 or 2
    pipeline stages."""
    chunk = chunk or saved_chunk(seqlen)
    per_group = heads // groups
    heads_options = sorted({h for h in (1, 2, 4, per_group) if h <= per_group})
    return [{"BLOCK_M": m, "BLOCK_K": k, "BLOCK_P": p, "HEADS": h, "num_warps": w, "num_stages": stages}
            for m, k, p, h, w, stages in itertools.product((16, 32, 64), (16, 32, 64), (32, 64), heads_options,
                                                           (4, 8), (1, 2))
            if m <= chunk and k <= chunk and p <= max(block(headdim), 32)
            and m * (block(headdim) + block(dstate)) <= 64 * 256]


def backward_unsupported_reason(headdim: int, dstate: int) -> str | None:
    """Why the backward kernels cannot take these sizes (on top of the forward's reasons), or None."""
    if block(headdim) * block(dstate) * 4 > MAX_STATE_TILE:
        return (f"a head dim of {headdim} by {dstate} states: the backward's row kernels hold that state tile in "
                f"float32 (at most {MAX_STATE_TILE // 1024} KiB, 64 x 256 or 128 x 128)")
    return None


@with_shapes(BACKWARD_SHAPES)
def ssd_scan_backward_reference(x, dt, A, B, C, dout, D=None, z=None, dt_bias=None, dt_softplus=False,
                                dt_limit=None, initial_state=None, dfinal_state=None) -> dict[str, torch.Tensor]:
    """{name: gradient} of ssd_scan_reference by autograd, in each input's dtype, for every tensor
    argument given (x, dt, A, B, C, and D, z, dt_bias, initial_state when given)."""
    given = {name: t for name, t in dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                                         initial_state=initial_state).items() if t is not None}
    leaves = {name: t.detach().requires_grad_() for name, t in given.items()}
    with torch.enable_grad():
        out, state = ssd_scan_reference(**leaves, dt_softplus=dt_softplus, dt_limit=dt_limit)
        outputs, grads = [out], [dout.to(out.dtype)]
        if dfinal_state is not None:
            outputs.append(state)
            grads.append(dfinal_state.to(state.dtype))
        found = torch.autograd.grad(outputs, list(leaves.values()), grads, allow_unused=True)
    return {name: torch.zeros_like(leaf) if grad is None else grad
            for (name, leaf), grad in zip(leaves.items(), found)}

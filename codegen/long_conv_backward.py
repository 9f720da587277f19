"""Backward of the FFT long convolution: the same DFT-as-matmul (Monarch) kernels, run as a correlation.

The forward (codegen.long_conv) computes, per batch row b and channel h, with K = k_f[h] the filter's
spectrum (scale / N folded in) and DFT the unnormalised N-point transform:

    v = u * pre_gate,   y = Re iDFT(DFT(v) * K) + D v,   out = y * post_gate

The adjoint of multiplying by K is multiplying by conj(K): a convolution's backward is a correlation.
With g = d loss / d out, gy = g * post_gate and V, GY the spectra of v and gy:

    dv        = Re iDFT(GY * conj(K)) + D gy          du = dv * pre_gate,  d pre_gate = dv * u
    d post    = g * y                                  y recomputed: Re iDFT(V * K) + D v
    d K       = sum over b of GY * conj(V)             per channel (the kernel's output dk_f)
    dk        = scale * Re iDFT(d K)[:Lk]              autograd through filter_spectrum (spectrum_grads)
    dD        = sum over b, t of gy v = Re sum_f d K / N   (Parseval)

One Triton kernel per LongConvSpec (codegen/templates/long_conv_backward.py.jinja) does the
per-row work in one pass over u, g and the gates: two forward transforms (V, GY), one or two inverse
ones, and the batch sum of GY * conj(V), accumulated in the program's own dk_f region. Each
program owns a channel and a share of its batch rows (`batch_splits` shares, so that small channel
counts still fill the GPU); the shares' partial spectra are summed by the caller, so the sum is
deterministic. Nothing but the operands is saved by the forward: no spectrum of length 2L per row.
"""
from __future__ import annotations

import inspect
import math

import torch

from codegen.long_conv import (
    DOT_PRECISION,
    MIN_PERSISTENT_PROGRAMS,
    SCRATCH_L2_BYTES,
    FFTPlan,
    LongConvSpec,
    long_conv_reference,
)
from codegen.long_conv import kernel_name as forward_kernel_name
from codegen.render import render

SCRATCH_PLANES = 4  # per program when P > 1: v's and gy's column transforms, real and imaginary


def kernel_name(spec: LongConvSpec) -> str:
    """e.g. long_conv_backward, long_conv_backward_D_pre_gate_post_gate."""
    return forward_kernel_name(spec).replace("long_conv", "long_conv_backward", 1)


def render_long_conv_backward(spec: LongConvSpec) -> str:
    """Python source of a module holding the backward kernel for `spec` and its `launch`."""
    return render("long_conv_backward.py.jinja", name=kernel_name(spec), spec=spec,
                  shapes_doc=inspect.getdoc(long_conv_backward_reference))


def batch_splits(batch: int, channels: int) -> int:
    """Shares of the batch rows per channel: one program per channel when there are enough
    channels to fill the GPU (MIN_PERSISTENT_PROGRAMS), else up to one per batch row."""
    return max(1, min(batch, math.ceil(MIN_PERSISTENT_PROGRAMS / channels)))


def program_count(plan: FFTPlan, n_items: int) -> int:
    """One program per (channel, share) when the row fits in registers; otherwise persistent
    programs, as many as SCRATCH_L2_BYTES of their scratch holds but at least MIN_PERSISTENT_PROGRAMS."""
    if plan.rows == 1:
        return n_items
    return min(n_items, max(MIN_PERSISTENT_PROGRAMS, SCRATCH_L2_BYTES // (SCRATCH_PLANES * plan.n * 4)))


def scratch_buffer(plan: FFTPlan, programs: int, device: torch.device) -> torch.Tensor:
    """Each program's (4, P, M) fp32 planes when P > 1; one unused element when P == 1."""
    size = programs * SCRATCH_PLANES * plan.n if plan.rows > 1 else 1
    return torch.empty(size, dtype=torch.float32, device=device)


def spectrum_grad_buffer(splits: int, k_f: torch.Tensor) -> torch.Tensor:
    """dk_f, the launch's output: (splits, H, 2, P, M1, M2) fp32, one partial sum per share of the batch."""
    return torch.empty((splits, *k_f.shape), dtype=torch.float32, device=k_f.device)


def dot_precision(u_dtype: torch.dtype, k_dtype: torch.dtype) -> str:
    """tl.dot input precision of the DFT products: u's (codegen.long_conv.DOT_PRECISION), but
    3xTF32 when the filter is wider than u, since dk then keeps fp32's bits."""
    if torch.promote_types(u_dtype, k_dtype) != u_dtype and u_dtype != torch.float32:
        return "tf32x3"
    return DOT_PRECISION[u_dtype]


def spectrum_grads(k: torch.Tensor, k_f: torch.Tensor, dk_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dD) from launch's partial spectra dk_f: k_f is the spectrum launch took, computed from k
    (requiring grad) by filter_spectrum with whatever options, so autograd through it gives dk
    (scale * Re iDFT(d K)[:Lk] for the plain filter); dD = Re sum_f d K / N (Parseval), in fp32."""
    total = dk_f.sum(0)
    (dk,) = torch.autograd.grad(k_f, k, total)
    return dk, total[:, 0].sum((1, 2, 3)) / math.prod(k_f.shape[2:])


def long_conv_backward_reference(
    u: torch.Tensor,
    k: torch.Tensor,
    grad: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    pre_gate: torch.Tensor | None = None,
    post_gate: torch.Tensor | None = None,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The gradients of long_conv_reference's operands for the output gradient `grad`, by name
    (u, k, and D, pre_gate, post_gate where given), each in its operand's dtype.

    long_conv_backward_reference differentiates long_conv_reference with autograd; launch runs the
    backward kernel of one LongConvSpec on the filter's spectrum k_f = filter_spectrum(k, L, scale=scale)
    into du (and dpre, dpost) and the partial spectra dk_f, which spectrum_grads turns into dk and dD.

        u, grad          (batch, channels, L)      any strides
        k                (channels, Lk), Lk <= L   launch takes k_f (channels, 2, P, M1, M2) fp32
        D                (channels,)               skip weight, or None; launch returns no dD (see dk_f)
        pre_gate         (batch, channels, L)      or None; launch writes its gradient into dpre
        post_gate        (batch, channels, L)      or None; launch writes its gradient into dpost
        du, dpre, dpost  (batch, channels, L)      launch: preallocated, any float dtype
        dk_f             (splits, channels, 2, P, M1, M2) fp32 (spectrum_grad_buffer): launch writes,
                         for each of the `splits` shares of the batch rows, sum_b DFT(gy_b) conj(DFT(v_b))
    """
    operands = dict(u=u, k=k, D=D, pre_gate=pre_gate, post_gate=post_gate)
    leaves = {name: t.detach().requires_grad_() for name, t in operands.items() if t is not None}
    with torch.enable_grad():
        out = long_conv_reference(leaves["u"], leaves["k"], D=leaves.get("D"), pre_gate=leaves.get("pre_gate"),
                                  post_gate=leaves.get("post_gate"), scale=scale)
        found = torch.autograd.grad(out, list(leaves.values()), grad.to(out.dtype))
    return dict(zip(leaves, found))

"""FlashAttention-2 backward: kernel specs, rendering, launch configs, PyTorch reference.

The forward (codegen/attention.py, spec.lse) stores O and each row's log-sum-exp in base 2,
lse = log2 sum_j 2^t_j = m + log2(l) of the base-2 scores t = s * log2(e), as its two terms (row
max m, log2 of the row sum l), so that p = 2^((t - m) - log2(l)) stays exact for rows made of huge
finite fills (finfo.min masks), whose m is near -FP32_MAX. Two Triton kernels per forward
spec, rendered from codegen/templates/attention_backward.py.jinja, recompute the weights block
by block from it instead of storing them (FlashAttention-2, Alg. 2):

    dq kernel     one program per (BLOCK_M query rows, batch * query head), key blocks streamed
                  (causal: only those up to the diagonal):
                      delta = rowsum(dO * O)                     stored for the dkdv kernel
                      for each key block:  p = 2^((t - m) - log2(l));  dp = dO v^T;  ds = p (dp - delta)
                                           dq += ds k
    dkdv kernel   one program per (BLOCK_N keys, batch * kv head); the G query heads that share
                  the kv head and their query blocks streamed (causal: only rows at or past the
                  diagonal), so dK and dV are summed over the group without repeating K and V:
                      dv += p^T dO;  dk += ds^T q
    dq, dk = scale * (dq, dk)

ds is the gradient of the scores s. Softcapping (s = cap * tanh(u), u = scale * q.k) multiplies
it by cap * (1 - tanh(u)^2); dropout keeps the weights the forward kept (the same Philox draws)
and scales p and dp by 1 / (1 - p_drop); scores a bool mask or the causal mask dropped get ds = 0
(as masked_fill's backward gives), so a fully masked row has dq = 0 and, as in eager, NaN
weights that make dV NaN (rows SDPA zeroes, empty_rows_zero, have log2(l) = +inf: p = 0, no gradient).

dq has a kernel of its own rather than atomic adds from the dkdv kernel (as FlashAttention-2's
Triton version and its deterministic mode): the gradients are bitwise the same run to run, at the
price of computing q k^T and dO v^T once more. The dq kernel runs first: it computes delta as it
loads dO and O anyway, so no separate pass over them is needed.

Like codegen.attention, this module does not import triton.
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, replace

import torch

from codegen.attention import (
    CANDIDATE_SMEM_BUDGET,
    DEFAULT_SMEM_BUDGET,
    MASK_ITEMSIZE,
    AttentionSpec,
    attention_reference,
    block_dim,
    scalar_args,
)
from codegen.attention import kernel_name as forward_kernel_name
from codegen.render import render

PARTS = ("dq", "dkdv")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")  # what default_config and config_space set


@dataclass(frozen=True)
class AttentionBackwardSpec:
    """One backward kernel: `part` ("dq" or "dkdv") of the gradients of the forward `forward`'s
    semantics (its lse flag is irrelevant here and canonicalised away). mask_grad: the dq kernel also
    stores the gradient of an additive mask (a learned bias, e.g. T5's or ALiBi's with learned slopes)."""

    forward: AttentionSpec
    part: str
    mask_grad: bool = False

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"AttentionBackwardSpec.part must be one of {PARTS}, got {self.part!r}")
        if self.mask_grad and (self.part != "dq" or self.forward.mask != "additive"):
            raise ValueError("only the dq kernel of an additive mask computes the mask's gradient")
        object.__setattr__(self, "forward", replace(self.forward, lse=False))


def kernel_name(spec: AttentionBackwardSpec) -> str:
    """The forward's name with `attention_bwd_<part>` in front, e.g. attention_bwd_dkdv_d64_causal
    (and `_dmask` after it when the kernel computes the mask's gradient)."""
    name = forward_kernel_name(spec.forward).replace("attention", f"attention_bwd_{spec.part}", 1)
    return name + ("_dmask" if spec.mask_grad else "")


def render_backward(spec: AttentionBackwardSpec) -> str:
    """Python source of a module holding the `spec.part` kernel and its `launch`."""
    return render(
        "attention_backward.py.jinja",
        name=kernel_name(spec),
        backward_spec=spec,
        spec=spec.forward,
        part=spec.part,
        mask_grad=spec.mask_grad,
        block_d=block_dim(spec.forward.head_dim),
        block_dv=block_dim(spec.forward.value_dim),
        shapes_doc=inspect.getdoc(attention_backward_reference),
    )


def backward_scalars(spec: AttentionSpec, scale: float, softcap: float | None, fill_value: float) -> tuple:
    """The forward's scalar arguments (codegen.attention.scalar_args), then the factor ds is turned into
    dq and dk by: the scale, times the cap under softcapping (ds/du = cap * (1 - tanh(u)^2))."""
    return (*scalar_args(spec, scale, softcap, fill_value), scale * (softcap if spec.softcap else 1.0))


def nan_values_of_empty_rows(dv: torch.Tensor, lse: torch.Tensor) -> None:
    """Eager's dV is NaN through every key of a head with a row whose weights are NaN (no visible key:
    lse -inf, or a NaN score). The causal dkdv kernel skips the key blocks past such a row's
    diagonal, so it set only those it visited: fill the rest, without a host sync."""
    batch, kv_heads = dv.shape[:2]
    empty = ~(lse.sum(dim=2) > float("-inf"))  # -inf or NaN
    dv.masked_fill_(empty.reshape(batch, kv_heads, -1).any(dim=-1)[..., None, None], float("nan"))


def _smem_bytes(spec: AttentionBackwardSpec, block_m: int, block_n: int, num_stages: int, itemsize: int) -> int:
    """Shared memory of the resident tiles plus `num_stages` buffered streamed tiles: the dq kernel keeps
    q, dO and streams k, v; the dkdv kernel keeps k, v and streams q, dO (and the mask, either way)."""
    d, dv = block_dim(spec.forward.head_dim), block_dim(spec.forward.value_dim)
    resident, streamed = (block_m, block_n) if spec.part == "dq" else (block_n, block_m)
    mask_bytes = MASK_ITEMSIZE[spec.forward.mask] * block_m * block_n
    return itemsize * resident * (d + dv) + num_stages * (itemsize * streamed * (d + dv) + mask_bytes)


# (resident rows, streamed rows, warps) by the widest padded head dim, for 16-bit inputs
_TILES_16BIT = {"dq": ((64, (128, 32, 4)), (128, (64, 32, 8)), (256, (64, 16, 8))),
                "dkdv": ((64, (128, 32, 8)), (128, (64, 32, 8)), (256, (32, 16, 8)))}


def default_config(spec: AttentionBackwardSpec, q_len: int, kv_len: int, *, itemsize: int = 2) -> dict:
    """A launch configuration that runs well untuned; `itemsize` is q's element size in bytes.

    The resident tile (dq: BLOCK_M query rows, dkdv: BLOCK_N keys) holds an fp32 accumulator per
    head dim (two in dkdv), so wider heads take fewer rows and more warps. Tiles stay within the
    registers ptxas gives a thread on an H100 without spilling (tests/codegen/cuda_compile_grid.py
    --markdown attention_backward): rows whose bytes are not a multiple of 16 (head dim 59 in 16
    bits, held in registers rather than streamed by cp.async) keep at most 64 resident rows on 8
    warps; dropout's Philox state and the mask gradient's stores take 8 warps, and dropout halves
    the dkdv kernel's streamed rows. fp32 inputs (exact dots on FMA units) take small tiles.
    Blocks shrink to short lengths; num_stages is the deepest pipeline of 3 or 2 (2 above head
    dim 128, where a third stage's registers spill) that fits DEFAULT_SMEM_BUDGET, else 1.
    """
    forward = spec.forward
    widest = max(block_dim(forward.head_dim), block_dim(forward.value_dim))
    if itemsize == 4:
        resident, streamed, num_warps, stages = (64 if widest <= 64 else 32), 16, 8, (2,)
    else:
        resident, streamed, num_warps = next(tiles for limit, tiles in _TILES_16BIT[spec.part] if widest <= limit)
        stages = (3, 2) if widest <= 128 else (2,)
        if not all(dim * itemsize % 16 == 0 for dim in (forward.head_dim, forward.value_dim)):
            resident, num_warps = min(resident, 64), 8
        if forward.dropout or spec.mask_grad:
            num_warps = 8
            streamed = max(16, streamed // 2) if forward.dropout and spec.part == "dkdv" else streamed
    block_m, block_n = (resident, streamed) if spec.part == "dq" else (streamed, resident)
    block_m, block_n = min(block_m, block_dim(q_len)), min(block_n, block_dim(kv_len))
    fitting = [s for s in stages if _smem_bytes(spec, block_m, block_n, s, itemsize) <= DEFAULT_SMEM_BUDGET]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": fitting[0] if fitting else 1}


def config_space(spec: AttentionBackwardSpec) -> list[dict]:
    """Autotuning candidates: resident tiles {64, 128} x streamed {16, 32, 64} x stages {2, 3} x warps
    {4, 8}, less those whose fp16 tiles cannot fit CANDIDATE_SMEM_BUDGET."""
    candidates = []
    for resident, streamed, num_stages, num_warps in itertools.product((64, 128), (16, 32, 64), (2, 3), (4, 8)):
        block_m, block_n = (resident, streamed) if spec.part == "dq" else (streamed, resident)
        if _smem_bytes(spec, block_m, block_n, num_stages, itemsize=2) <= CANDIDATE_SMEM_BUDGET:
            candidates.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps,
                               "num_stages": num_stages})
    return candidates


def attention_backward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                                 **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_reference(q, k, v, **options) for the output gradient dout.

    attention_backward_reference differentiates the PyTorch reference (tests); the dq kernel's
    launch computes dq (and delta), the dkdv kernel's dk and dv, from the forward's out and lse.

        q, dq       (batch, q_heads, q_len, head_dim)     any strides
        k, dk       (batch, kv_heads, kv_len, head_dim)   dk, dv summed over the q_heads // kv_heads
        v, dv       (batch, kv_heads, kv_len, value_dim)  query heads that share each kv head
        out, dout   (batch, q_heads, q_len, value_dim)    the forward's output and its gradient
        lse         (batch, q_heads, 2, q_len) fp32       contiguous: the forward's row log-sum-exp in
                                                          base 2, as its terms m and log2(l)
        delta       (batch, q_heads, q_len) fp32          contiguous: rowsum(dout * out), written by
                                                          the dq kernel, read by the dkdv kernel
        mask        broadcastable to (batch, q_heads, q_len, kv_len), or None

    The options (scale, mask, mask_keep_when, fill_value, causal, causal_offset, empty_rows_zero,
    softcap, dropout_p) are attention_reference's; the kernels take the forward's dropout seed
    where the reference takes the kept elements (dropout_keep).
    """
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with torch.enable_grad():
        out = attention_reference(*leaves, **options)
        return torch.autograd.grad(out, leaves, dout)

"""FlashAttention-2 forward: kernel specialisation, rendering, launch configs, PyTorch reference.

One Triton kernel is rendered per AttentionSpec (head dims, mask kind, causal) from
codegen/templates/attention.py.jinja. Each program keeps a tile of BLOCK_M query rows resident
and streams BLOCK_N-key blocks of K and V through an online softmax (FlashAttention-2, Alg. 1),
with scores kept in base 2 so that every exponential is an exp2:

    m = -inf, l = 0, acc = 0                            per query row, fp32
    for each KV block, skipping blocks wholly past the causal diagonal:
        t   = (q k^T) * scale * log2(e), masks applied  base-2 scores
        m'  = max(m, rowmax(t));  p = 2^(t - m')
        l   = l * 2^(m - m') + rowsum(p);  acc = acc * 2^(m - m') + p v;  m = m'
    out = acc / l                                       0 / 0 = NaN where no key is visible
    (empty_rows_zero: 0 where l = 0, i.e. every score was -inf; a NaN score makes l NaN instead)

This module holds what the compiler and runtime need around the generated kernel: the spec and
its name, the renderer, launch configurations (a heuristic default and the autotuning space), the
admission check `unsupported_reason`, and `attention_reference`, the same semantics in plain
PyTorch. The reference and the generated `launch` share one docstring (the reference's) and the
argument helpers `score_shape` and `broadcast_mask`.

This module does not import triton: on a CPU-only machine triton must first be imported after
runtime.interpret has switched the interpreter on, which loading a generated module does.
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass

import torch

from codegen.render import render
from ir.limits import KERNEL_DTYPES, MAX_GRID_YZ, MAX_HEAD_DIM, SHARED_MEMORY_LIMIT

MASK_KINDS = ("none", "bool", "additive")
LOG2E = math.log2(math.e)
FP32_MAX = torch.finfo(torch.float32).max

# Shared memory a config may plan for: the default config must fit an A100 (164 KB per block,
# less headroom); autotuning candidates only need to fit the largest GPU, an H100 (227 KB).
DEFAULT_SMEM_BUDGET = 160 * 1024
CANDIDATE_SMEM_BUDGET = SHARED_MEMORY_LIMIT[90]

MASK_ITEMSIZE = {"none": 0, "bool": 1, "additive": 4}  # bytes per mask element (fp32 for additive)
_MASK_NAMES = {("bool", True): "boolmask", ("bool", False): "fillmask", ("additive", True): "addmask"}


@dataclass(frozen=True)
class AttentionSpec:
    """What one rendered kernel is specialised for; everything else is a launch argument.

    head_dim:       D, the head dim of q and k (1..256)
    value_dim:      Dv, the head dim of v and out (1..256)
    mask:           "none", "bool" (kept scores vs fill_value) or "additive" (added to scores)
    mask_keep_when: bool masks only: True keeps a score where the mask is True (SDPA's
                    convention), False keeps it where the mask is False (masked_fill's)
    causal:         key j is visible to query i only when j <= i + causal_offset
    empty_rows_zero: a row with no visible key (all scores -inf) gives 0, as SDPA does, instead
                    of eager softmax's NaN
    softcap:        scores are capped before the mask, softcap * tanh(scale * q . k) (Gemma 2's
                    and Grok's logit soft-capping); the cap is a launch argument
    lse:            also store each row's log-sum-exp, in base 2 (log2 sum_j 2^t_j of the base-2
                    scores t = s * log2(e)), fp32, for the backward (codegen.attention_backward), as
                    its two terms m + log2(l) (the row max and the log of the row sum; lse_shape)
    dropout:        dropout on the weights (training): each is kept with probability 1 - p and
                    scaled by 1 / (1 - p), by Philox draws from a seed and the score's index
    """

    head_dim: int
    value_dim: int
    mask: str = "none"
    mask_keep_when: bool = True
    causal: bool = False
    empty_rows_zero: bool = False
    softcap: bool = False
    lse: bool = False
    dropout: bool = False

    def __post_init__(self):
        for field in ("head_dim", "value_dim"):
            value = getattr(self, field)
            if not 1 <= value <= MAX_HEAD_DIM:
                raise ValueError(f"AttentionSpec.{field} must be in 1..{MAX_HEAD_DIM}, got {value}")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"AttentionSpec.mask must be one of {MASK_KINDS}, got {self.mask!r}")
        if self.mask != "bool":
            # The polarity means nothing without a bool mask: one canonical spec per kernel.
            object.__setattr__(self, "mask_keep_when", True)


def block_dim(n: int) -> int:
    """`n` padded to the power of two >= 16 that a tile dimension (and tl.dot) needs."""
    return max(16, 1 << (n - 1).bit_length())


def kernel_name(spec: AttentionSpec) -> str:
    """A short descriptive name, e.g. attention_d64_causal_boolmask, attention_d128_dv64."""
    parts = ["attention", f"d{spec.head_dim}"]
    if spec.value_dim != spec.head_dim:
        parts.append(f"dv{spec.value_dim}")
    if spec.causal:
        parts.append("causal")
    if spec.mask != "none":
        parts.append(_MASK_NAMES[spec.mask, spec.mask_keep_when])
    if spec.empty_rows_zero:
        parts.append("zeroempty")
    parts += [flag for flag in ("softcap", "lse", "dropout") if getattr(spec, flag)]
    return "_".join(parts)


def render_attention(spec: AttentionSpec) -> str:
    """Python source of a module holding the kernel for `spec` and its `launch`."""
    return render(
        "attention.py.jinja",
        name=kernel_name(spec),
        spec=spec,
        block_d=block_dim(spec.head_dim),
        block_dv=block_dim(spec.value_dim),
        shapes_doc=inspect.getdoc(attention_reference),
    )


def to_base2(value: float) -> float:
    """`value` * log2(e), saturated at +-FP32_MAX so that a finite value stays finite in fp32.

    finfo(float32).min * log2(e) would overflow to -inf and turn a row filled with it (uniform
    weights in eager PyTorch) into a NaN row. A saturated value still gets zero weight next to
    any ordinary score, and a row made of it alone still gets uniform weights. Infinities stay.
    """
    if math.isinf(value):
        return value
    return max(-FP32_MAX, min(FP32_MAX, value * LOG2E))


def scalar_args(spec: AttentionSpec, scale: float, softcap: float | None, fill_value: float) -> tuple[float, ...]:
    """The kernel's scalar arguments: qk_scale, then softcap and fill when the spec takes them.

    Scores live in base 2 (t = s * log2(e)): qk_scale is to_base2(scale), or with a softcap the
    plain scale inside the tanh and to_base2(softcap) outside it."""
    if spec.softcap != (softcap is not None):
        raise ValueError(f"{kernel_name(spec)}: softcap={softcap} does not fit a kernel rendered for {spec}")
    scalars = (scale, to_base2(softcap)) if spec.softcap else (to_base2(scale),)
    return scalars + ((to_base2(fill_value),) if spec.mask == "bool" else ())


def lse_shape(q_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(batch, q_heads, 2, q_len): the shape of the forward's lse for a 4-d q, [:, :, 0] the row max m
    and [:, :, 1] log2 of the row sum l, both in base 2 (lse = m + log2(l))."""
    return (*q_shape[:2], 2, q_shape[2])


def forward_extras(spec: AttentionSpec, shape: tuple[int, ...], lse: torch.Tensor | None, dropout_p: float,
                   seed: torch.Tensor | None) -> list[torch.Tensor]:
    """The forward kernel's pointers after the mask: the lse buffer, then the dropout seed, as the
    spec takes them (checked: a buffer of the wrong shape would be written out of bounds)."""
    if spec.lse != (lse is not None) or spec.dropout != (seed is not None) or spec.dropout != (dropout_p > 0):
        raise ValueError(f"{kernel_name(spec)}: lse={lse is not None}, dropout_p={dropout_p}, seed={seed is not None} "
                         f"do not fit a kernel rendered for {spec}")
    if lse is not None and (lse.shape != lse_shape(shape) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous fp32 tensor of shape {lse_shape(shape)}")
    if seed is not None and (seed.numel() != 1 or seed.dtype != torch.int64 or not dropout_p < 1):
        raise ValueError("dropout needs a 1-element int64 seed and dropout_p < 1")
    return [tensor for tensor in (lse, seed) if tensor is not None]


def _smem_bytes(spec: AttentionSpec, block_m: int, block_n: int, num_stages: int, itemsize: int) -> int:
    """Shared memory of the Q tile plus `num_stages` buffered K, V (and mask) blocks."""
    d, dv = block_dim(spec.head_dim), block_dim(spec.value_dim)
    mask_itemsize = MASK_ITEMSIZE[spec.mask]
    return itemsize * block_m * d + num_stages * block_n * (itemsize * (d + dv) + mask_itemsize * block_m)


CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")  # what default_config and config_space set


def default_config(spec: AttentionSpec, q_len: int, kv_len: int, *, itemsize: int = 2) -> dict:
    """A launch configuration that runs well untuned; `itemsize` is q's element size in bytes.

    Short queries (decode) get BLOCK_M 16, head dims above 128 smaller tiles, few keys a BLOCK_N
    no larger than needed; num_stages is the deepest K/V pipeline (3, 2, else 1) that fits
    DEFAULT_SMEM_BUDGET. Tiles stay within the registers ptxas gives a thread on an H100
    without spilling (tests/codegen/cuda_compile_grid.py --markdown shows the counts):
    fp32 dots (exact, on FMA units) hold their operands in registers, and so do K/V rows whose
    bytes are not a multiple of 16 (a head dim of 59 or 111 in 16 bits), which cp.async cannot
    stream through shared memory; nor do dropout's Philox draws on 4 warps. Callers should pass
    `itemsize`.
    """
    widest = max(block_dim(spec.head_dim), block_dim(spec.value_dim))
    if q_len <= 16:
        block_m = 16
    elif q_len <= 64 or widest > 128 or itemsize == 4:
        block_m = 64
    else:
        block_m = 128
    stages = (3, 2)
    if itemsize == 4:
        block_n, num_warps, stages = (32 if widest <= 64 else 16), 8, (2,)
    else:
        streamed = all(dim * itemsize % 16 == 0 for dim in (spec.head_dim, spec.value_dim))
        block_n = 64 if widest <= 128 and streamed else 32
        num_warps = 8 if widest > 128 or (block_m == 128 and (widest == 128 or not streamed or spec.dropout)) else 4
    block_n = min(block_n, block_dim(kv_len))
    fitting = [s for s in stages if _smem_bytes(spec, block_m, block_n, s, itemsize) <= DEFAULT_SMEM_BUDGET]
    num_stages = fitting[0] if fitting else 1
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def config_space(spec: AttentionSpec) -> list[dict]:
    """Autotuning candidates: BLOCK_M {64,128} x BLOCK_N {32,64,128} x stages {2,3,4} x warps {4,8},
    less those whose fp16 tiles (Q, pipelined K, V and mask) cannot fit CANDIDATE_SMEM_BUDGET."""
    return [
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
        for block_m, block_n, num_stages, num_warps in itertools.product((64, 128), (32, 64, 128), (2, 3, 4), (4, 8))
        if _smem_bytes(spec, block_m, block_n, num_stages, itemsize=2) <= CANDIDATE_SMEM_BUDGET
    ]


def score_shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, q_heads, q_len, kv_len): the shape of the score matrix and of a broadcast mask."""
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def broadcast_mask(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`mask` as a view of `shape`: broadcast dims get stride 0 and nothing is copied."""
    return None if mask is None else mask.expand(shape)


def unsupported_reason(q, k, v, mask=None) -> str | None:
    """Why the kernel cannot take these operands, in words for report(); None when it can."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            return f"{name} has {tensor.dim()} dims, expected 4 (batch, heads, seq, head_dim)"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not float16, bfloat16 or float32"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    devices = {tensor.device for tensor in (q, k, v, mask) if tensor is not None}
    if len(devices) > 1:
        return f"operands are on different devices ({', '.join(sorted(map(str, devices)))})"
    return _shape_reason(q, k, v) or _mask_reason(mask, score_shape(q, k))


def _shape_reason(q, k, v) -> str | None:
    (batch, q_heads, _, head_dim), (k_batch, kv_heads, kv_len, k_dim) = q.shape, k.shape
    v_batch, v_heads, v_len, value_dim = v.shape
    if not batch == k_batch == v_batch:
        return f"batch sizes differ (q {batch}, k {k_batch}, v {v_batch})"
    if v_heads != kv_heads or v_len != kv_len:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length"
    if k_dim != head_dim:
        return f"q and k head dims differ ({head_dim} vs {k_dim})"
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return "an operand is empty"
    if max(head_dim, value_dim) > MAX_HEAD_DIM:
        return f"head dim {max(head_dim, value_dim)} > {MAX_HEAD_DIM}"
    if q_heads % kv_heads:
        return f"{q_heads} query heads are not a multiple of {kv_heads} kv heads"
    if batch * q_heads > MAX_GRID_YZ:  # the grid's second axis
        return f"batch * q_heads = {batch * q_heads} exceeds the launch grid's limit of {MAX_GRID_YZ}"
    return None


def _mask_reason(mask, shape: tuple[int, ...]) -> str | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return f"mask dtype {mask.dtype} is neither bool nor floating point"
    broadcastable = mask.dim() <= 4 and all(m in (1, s) for m, s in zip(reversed(mask.shape), reversed(shape)))
    if not broadcastable:
        return f"mask {tuple(mask.shape)} does not broadcast to (batch, q_heads, q_len, kv_len) {shape}"
    return None


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    mask_keep_when: bool = True,
    fill_value: float = float("-inf"),
    causal: bool = False,
    causal_offset: int = 0,
    empty_rows_zero: bool = False,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = softmax(masked(scale * q @ k^T)) @ v, per batch and query head.

    attention_reference computes it in plain PyTorch (tests, CPU fallback); launch runs the fused
    kernel of one AttentionSpec, which fixes the mask kind, mask_keep_when and causal, into out.

        q     (batch, q_heads, q_len, head_dim)      any strides
        k     (batch, kv_heads, kv_len, head_dim)    q_heads % kv_heads == 0: query head h reads
        v     (batch, kv_heads, kv_len, value_dim)   kv head h // (q_heads // kv_heads) (GQA/MQA)
        mask  broadcastable to (batch, q_heads, q_len, kv_len), or None
        out   (batch, q_heads, q_len, value_dim)     launch: preallocated, any float dtype

    Scores s = (q . k) * scale are computed in fp32 (fp64 for fp64 inputs), then capped to
    s = softcap * tanh(s) when softcap is given. A bool mask keeps s
    where mask == mask_keep_when and replaces it with fill_value elsewhere (masked_fill: fill
    -inf gives a fully masked row NaN, a finite fill gives it uniform weights); a float mask is
    added to s. causal: key j is visible to query i iff j <= i + causal_offset (0 aligns top-left
    like SDPA's is_causal, kv_len - q_len bottom-right like flash-attn); invisible scores are
    -inf, applied after the mask. Rows whose scores are all -inf (or that have no keys) come out
    NaN, as in eager softmax, or 0 with empty_rows_zero (SDPA's convention, with zero gradients);
    a NaN score makes its row NaN either way. dropout_p: the weights are dropped out (kept where
    dropout_keep, a bool tensor of the scores' shape, is True, else by torch's generator) and scaled
    by 1 / (1 - dropout_p); launch draws its own. The weights are cast to v's dtype before the
    product with v.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = capped_scores(q, k, scale, softcap)
    mask = broadcast_mask(mask, scores.shape)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(mask != mask_keep_when, fill_value)
    elif mask is not None:
        scores = scores + mask.to(scores.dtype)
    if causal:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril(causal_offset)
        scores = scores.masked_fill(~visible, float("-inf"))
    if empty_rows_zero:  # every score -inf (true of no keys at all); a NaN score is not, and stays NaN
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        weights = scores.masked_fill(empty, 0.0).softmax(dim=-1).masked_fill(empty, 0.0)  # no NaN in the backward
    else:
        weights = scores.softmax(dim=-1)
    if dropout_p and dropout_keep is not None:
        weights = weights * dropout_keep / (1 - dropout_p)
    elif dropout_p:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return torch.matmul(weights.to(v.dtype), v)


def capped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """(q @ k^T) * scale in fp32 (fp64 for fp64 inputs), as softcap * tanh(...) when softcap is given;
    k already has q's heads."""
    scores = torch.matmul(q, k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    return scores if softcap is None else softcap * torch.tanh(scores)

"""Split-KV decode attention (flash-decoding): spec, rendering, split count, launch configs.

Short queries against a long KV cache (decoding one token, or a speculative-decoding tree of a
few dozen) give FlashAttention-2's grid of (query tiles, batch * heads) too few programs to fill
a GPU, and make each query head of a GQA group read its kv head again. The decode kernel, rendered
per DecodeSpec from codegen/templates/attention_decode.py.jinja, instead

  - packs the G = q_heads // kv_heads query heads of a group and their q_len queries into the
    rows (M) of one tile: row r = g * q_len + i, so each K/V block is read once per group;
  - cuts the cache into S splits of whole key blocks, one program each, so batch 1 fills the GPU;
  - keeps each split's unnormalised softmax state in an fp32 workspace, and a second small kernel
    merges the splits with a log-sum-exp reduction:

    for each (row tile, split s, batch * kv head), in parallel:      decode kernel
        (acc_s, m_s, l_s) = online softmax (base 2) over the split's keys, as FlashAttention-2
    for each (batch, head, query), in parallel:                       combine kernel
        M = max_s m_s;  w_s = 2^(m_s - M);  out = sum_s w_s acc_s / sum_s w_s l_s

The semantics are AttentionSpec's and codegen.attention.attention_reference's (masks, causal
offset, empty rows, dtypes, strides), and so is `launch`'s signature: the runtime picks this
kernel or the prefill one by shape alone (runtime/attention.py). Operands that
codegen.attention.unsupported_reason accepts are accepted here too.

Like codegen.attention, this module does not import triton.
"""
from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass

import torch

from codegen.attention import (
    CANDIDATE_SMEM_BUDGET,
    DEFAULT_SMEM_BUDGET,
    AttentionSpec,
    _smem_bytes,
    attention_reference,
    block_dim,
)
from codegen.attention import kernel_name as attention_kernel_name
from codegen.render import render
from ir.limits import MAX_GRID_YZ, cdiv

CPU_SM_COUNT = 4  # Triton's interpreter: enough programs per split to exercise the combine
PROGRAMS_PER_SM = 2  # default split count aims at two resident programs per SM (3-stage tiles fit)
MIN_SPLIT_KEYS = 128  # a split streams at least this many keys...
WORKSPACE_KEYS_PER_ROW = 8  # ...and at least 8 per packed row: fp32 partials stay << K/V bytes
MAX_BLOCK_M = 64  # more packed rows (trees on GQA groups) take several row tiles


@dataclass(frozen=True)
class DecodeSpec(AttentionSpec):
    """AttentionSpec's fields for the decode kernel: a type of its own, so that the decode and
    prefill kernels of the same semantics are different specs (names, caches, loaded modules)."""


def kernel_name(spec: DecodeSpec) -> str:
    """The prefill kernel's name with `attention_decode` in front, e.g. attention_decode_d128_causal."""
    return attention_kernel_name(spec).replace("attention", "attention_decode", 1)


def render_decode(spec: DecodeSpec) -> str:
    """Python source of a module holding the decode and combine kernels for `spec` and `launch`."""
    name = kernel_name(spec)
    return render(
        "attention_decode.py.jinja",
        name=name,
        combine_name=name.replace("attention_decode", "attention_combine", 1),
        spec=spec,
        block_d=block_dim(spec.head_dim),
        block_dv=block_dim(spec.value_dim),
        shapes_doc=inspect.getdoc(attention_reference),
    )


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100); CPU_SM_COUNT elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def num_splits(kv_len: int, rows: int, kv_rows: int, sm_count: int, block_m: int, block_n: int) -> int:
    """How many splits to cut the keys into (the heuristic default).

    rows: packed rows per kv head (group * q_len); kv_rows: batch * kv_heads. Enough splits for
    PROGRAMS_PER_SM programs per SM, but each split at least MIN_SPLIT_KEYS keys, one block, and
    WORKSPACE_KEYS_PER_ROW keys per packed row (so the fp32 partials, 8 bytes per row and value
    dim written and read back, stay well under the K/V bytes the split streams).
    """
    programs = kv_rows * cdiv(rows, block_m)
    wanted = cdiv(PROGRAMS_PER_SM * sm_count, programs)
    min_keys = max(MIN_SPLIT_KEYS, block_n, WORKSPACE_KEYS_PER_ROW * rows)
    return max(1, min(wanted, cdiv(kv_len, min_keys), MAX_GRID_YZ))


def split_keys(kv_len: int, splits: int, block_n: int) -> int:
    """Keys per split: kv_len over `splits` (at most MAX_GRID_YZ), rounded up to whole BLOCK_N blocks.

    cdiv(kv_len, split_keys(...)) <= splits, so the grid never exceeds the requested split count."""
    per_split = cdiv(kv_len, min(max(splits, 1), MAX_GRID_YZ))
    return cdiv(per_split, block_n) * block_n


def _block_m(rows: int) -> int:
    return min(block_dim(rows), MAX_BLOCK_M)


# What default_config and config_space set.
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_splits", "num_warps", "num_stages")


def default_config(spec: DecodeSpec, q_len: int, kv_len: int, *, group: int = 1, kv_rows: int = 1,
                   sm_count: int = CPU_SM_COUNT, itemsize: int = 2) -> dict:
    """A launch configuration that runs well untuned.

    group: q_heads // kv_heads; kv_rows: batch * kv_heads; itemsize: q's element size in bytes.
    BLOCK_M covers the packed rows (group * q_len, at least 16, at most MAX_BLOCK_M); BLOCK_N is
    64 keys (32 for head dims above 128, fewer for short caches); num_stages the deepest K/V
    pipeline of 3 or 2 that fits DEFAULT_SMEM_BUDGET; num_splits from `num_splits`.
    """
    rows = group * q_len
    block_m = _block_m(rows)
    widest = max(block_dim(spec.head_dim), block_dim(spec.value_dim))
    block_n = min(64 if widest <= 128 else 32, block_dim(kv_len))
    fitting = [s for s in (3, 2) if _smem_bytes(spec, block_m, block_n, s, itemsize) <= DEFAULT_SMEM_BUDGET]
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_splits": num_splits(kv_len, rows, kv_rows, sm_count, block_m, block_n),
        "num_warps": 4,
        "num_stages": fitting[0] if fitting else 1,
    }


def config_space(spec: DecodeSpec, q_len: int, kv_len: int, *, group: int = 1, kv_rows: int = 1,
                 sm_count: int = CPU_SM_COUNT) -> list[dict]:
    """Autotuning candidates: BLOCK_N {32,64,128} x stages {2,3,4} x warps {4,8} x num_splits of
    1/2, 1, 2 and 4 times the heuristic's (at most one split per key block), at the default
    BLOCK_M, less those whose fp16 tiles cannot fit CANDIDATE_SMEM_BUDGET."""
    rows = group * q_len
    block_m = _block_m(rows)
    candidates = []
    for block_n, num_stages, num_warps in itertools.product((32, 64, 128), (2, 3, 4), (4, 8)):
        if _smem_bytes(spec, block_m, block_n, num_stages, itemsize=2) > CANDIDATE_SMEM_BUDGET:
            continue
        heuristic = num_splits(kv_len, rows, kv_rows, sm_count, block_m, block_n)
        most = cdiv(kv_len, block_n)
        for splits in sorted({max(1, min(most, heuristic * factor // 2)) for factor in (1, 2, 4, 8)}):
            candidates.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "num_splits": splits,
                               "num_warps": num_warps, "num_stages": num_stages})
    return candidates

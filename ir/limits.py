"""Hardware and kernel limits, defined once: the passes read them to decide what to match, codegen
and the runtime to decide what to launch.

    KERNEL_DTYPES          the floating dtypes every family's kernels read and write
    MAX_GRID_YZ            CUDA's limit on a launch grid's second and third axes (the first: 2^31 - 1)
    SHARED_MEMORY_LIMIT    opt-in shared memory per block by compute capability (an H100: 227 KiB)
    MAX_HEAD_DIM           the attention kernels' largest head dim
    MASKED_OUT             attention scores at or below it, next to a visible score, get exactly zero
                           weight (their exp underflows): a mask filling at most this drops a score
    MIN_SHORT_CONV_WIDTH, MAX_SHORT_CONV_WIDTH    the short-convolution kernel's filter widths (taps)
    cdiv                   ceil(a / b) for launch grids on the host (triton.cdiv, a constexpr function,
                           costs microseconds a call from host code)
"""
from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_YZ = 65535
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}
MAX_HEAD_DIM = 256
MASKED_OUT = -6.0e4
MIN_SHORT_CONV_WIDTH, MAX_SHORT_CONV_WIDTH = 2, 8


def cdiv(a: int, b: int) -> int:
    return -(-a // b)

"""Decode attention: short queries against a long KV cache, ours against the peers.

Configs: shared/anchors/h100.md's decode grid (one query, head dim 128, bf16, batch 1..64,
caches of 4k..128k keys, MHA and GQA 32:4 / 32:8), and speculative-decoding trees (16 and 64
draft tokens with a tree mask, as Medusa verifies them), which SDPA's flash and cuDNN backends
cannot take. Decoding reads the whole cache once per step, so the rate is bandwidth:

    bytes = K and V read once + q read + out written (the mask is not counted)

    ours            compiler.compile(F.scaled_dot_product_attention module) (the user's path)
    sdpa-flash      SDPA restricted to its FlashAttention-2 backend
    sdpa-cudnn      SDPA restricted to cuDNN
    sdpa-efficient  SDPA restricted to memory-efficient attention
    sdpa-math       SDPA's unfused math backend

Timing is benchmarks.common.bench_ms (do_bench flushes L2 before each call, which also hides
the host-side launch cost of a call shorter than the flush).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from benchmarks.common import Row, bench_ms, run_configs


class SdpaDecode(nn.Module):
    def forward(self, q, k, v, *mask):
        return F.scaled_dot_product_attention(q, k, v, *mask, enable_gqa=True)


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """headline (benchmarks/gpu_check.py): the small-cache GQA row where SDPA is furthest from the
    floor, a large-batch row at it, and a 64-token tree (quick: the batch-1 rows)."""
    if quick:
        configs = [dict(batch=1, q_heads=4, kv_heads=2, q_len=1, kv_len=512, head_dim=32, mask="none"),
                   dict(batch=2, q_heads=4, kv_heads=4, q_len=1, kv_len=300, head_dim=32, mask="none"),
                   dict(batch=1, q_heads=4, kv_heads=2, q_len=4, kv_len=512, head_dim=32, mask="tree")]
        return [config for config in configs if config["batch"] == 1] if headline else configs
    decode = [(1, 8192, 32, 4), (1, 8192, 32, 32), (1, 32768, 32, 8), (8, 8192, 32, 4), (1, 131072, 32, 4),
              (16, 32768, 32, 32), (64, 4096, 32, 8)]
    trees = [(1, 16, 8192, 32, 8), (1, 64, 8192, 32, 8), (8, 16, 4096, 32, 8)]
    if headline:
        decode, trees = [(1, 8192, 32, 4), (64, 4096, 32, 8)], [(1, 64, 8192, 32, 8)]
    return ([dict(batch=b, q_heads=hq, kv_heads=hkv, q_len=1, kv_len=lk, head_dim=128, mask="none")
             for b, lk, hq, hkv in decode]
            + [dict(batch=b, q_heads=hq, kv_heads=hkv, q_len=lq, kv_len=lk, head_dim=128, mask="tree")
               for b, lq, lk, hq, hkv in trees])


def bytes_moved(config: dict, itemsize: int) -> int:
    """K and V read once, q read and out written, in bytes."""
    cache = config["batch"] * config["kv_heads"] * config["kv_len"] * 2 * config["head_dim"]
    queries = config["batch"] * config["q_heads"] * config["q_len"] * 2 * config["head_dim"]
    return itemsize * (cache + queries)


def tree_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(q_len, kv_len) bool, True = visible: the cache, then a binary tree of q_len draft tokens
    (token i's parent is (i - 1) // 2), each seeing the cache, its ancestors and itself."""
    cached = kv_len - q_len
    visible = torch.zeros(q_len, kv_len, dtype=torch.bool)
    visible[:, :cached] = True
    for node in range(q_len):
        ancestor = node
        while ancestor >= 0:
            visible[node, cached + ancestor] = True
            ancestor = (ancestor - 1) // 2 if ancestor else -1
    return visible.to(device)


def _sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, *mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, *mask, enable_gqa=True)

    return run


def peers(device) -> dict:
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa-math": _sdpa_backend(SDPBackend.MATH)}
    return {
        "sdpa-flash": _sdpa_backend(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": _sdpa_backend(SDPBackend.CUDNN_ATTENTION),
        "sdpa-efficient": _sdpa_backend(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-math": _sdpa_backend(SDPBackend.MATH),
    }


def measure(config: dict, device, dtype) -> Row:
    batch, q_len, kv_len, head_dim = config["batch"], config["q_len"], config["kv_len"], config["head_dim"]
    q = torch.randn(batch, config["q_heads"], q_len, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, config["kv_heads"], kv_len, head_dim, device=device, dtype=dtype)
            for _ in range(2))
    args = (q, k, v) + ((tree_mask(q_len, kv_len, device),) if config["mask"] == "tree" else ())
    compiled = compiler.compile(SdpaDecode())
    with torch.no_grad():
        ours = bench_ms(lambda: compiled(*args))
        peer_ms = {name: bench_ms(lambda fn=fn: fn(*args)) for name, fn in peers(device).items()}
    used = any(kernel.name.startswith("attention_decode") for kernel in compiled.kernels)
    work = {"bytes": bytes_moved(config, q.element_size())}
    return Row("attention_decode", config, ours, peer_ms, work=work, notes="" if used else "decode kernel not used")


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return run_configs("attention_decode", grid(quick, headline), lambda config: measure(config, device, dtype))

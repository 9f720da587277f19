"""Attention forward on the FlashAttention-2 paper's grid, ours against the peers.

Grid: batch * seqlen = 16k tokens, heads * headdim = 2048, head dim 64 and 128,
L 512..16k, causal and not, bf16. FLOPs = 4 * B * H * L * L * d, halved when causal.

    ours            compiler.compile(F.scaled_dot_product_attention module) (the user's path)
    sdpa-flash      SDPA restricted to its FlashAttention-2 backend
    sdpa-cudnn      SDPA restricted to cuDNN
    sdpa-efficient  SDPA restricted to memory-efficient attention
    flex            FlexAttention under torch.compile (causal via a block mask)
    inductor-naive  torch.compile (Inductor) of the naive masked_fill(triu) spelling

headline=True (benchmarks/gpu_check.py): L 4k only (quick: 128), without inductor-naive, whose
compile costs more of a five-minute check than its row tells (the anchors: 31-80 TFLOP/s causal).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from benchmarks.common import Row, bench_ms, run_configs


class SdpaModule(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class NaiveModule(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.causal:
            length = q.shape[-2]
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def grid(quick: bool, headline: bool = False) -> list[dict]:
    if quick:
        configs = [dict(head_dim=32, seqlen=length, batch=1, heads=2, causal=causal)
                   for length in (64, 128) for causal in (False, True)]
    else:
        configs = [dict(head_dim=d, seqlen=length, batch=16384 // length, heads=2048 // d, causal=causal)
                   for d in (64, 128) for length in (512, 1024, 2048, 4096, 8192, 16384) for causal in (False, True)]
    if headline:
        return [config for config in configs if config["seqlen"] == (128 if quick else 4096)]
    return configs


def flops(config: dict) -> float:
    total = 4 * config["batch"] * config["heads"] * config["seqlen"] ** 2 * config["head_dim"]
    return total / 2 if config["causal"] else total


def _sdpa_backend(backend, causal):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _flex(causal: bool, length: int, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    if not causal:
        return lambda q, k, v: compiled(q, k, v)
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, length, length, device=device)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def peers(config: dict, device, headline: bool = False) -> dict:
    causal = config["causal"]
    if device.type != "cuda":
        return {"sdpa-math": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    from torch.nn.attention import SDPBackend

    found = {
        "sdpa-flash": _sdpa_backend(SDPBackend.FLASH_ATTENTION, causal),
        "sdpa-cudnn": _sdpa_backend(SDPBackend.CUDNN_ATTENTION, causal),
        "sdpa-efficient": _sdpa_backend(SDPBackend.EFFICIENT_ATTENTION, causal),
        "flex": _flex(causal, config["seqlen"], device),
    }
    if not headline:
        found["inductor-naive"] = torch.compile(NaiveModule(causal))
    return found


def measure(config: dict, device, dtype, headline: bool = False) -> Row:
    shape = (config["batch"], config["heads"], config["seqlen"], config["head_dim"])
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    compiled = compiler.compile(SdpaModule(config["causal"]))
    with torch.no_grad():
        ours = bench_ms(lambda: compiled(q, k, v))
        peer_ms = {name: bench_ms(lambda fn=fn: fn(q, k, v)) for name, fn in peers(config, device, headline).items()}
    return Row("attention", config, ours, peer_ms, work={"flops": flops(config)},
               notes="" if "attention" in compiled.patterns else "attention pass did not fire")


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return run_configs("attention", grid(quick, headline), lambda config: measure(config, device, dtype, headline))

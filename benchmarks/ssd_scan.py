"""Mamba-2's SSD scan and its decode step, ours against Hugging Face's PyTorch path.

    scan    Hugging Face's mamba2_chunk_scan as Mamba2Mixer calls it (chunks of 256, D skip,
            dt_bias, softplus, dt limits (0, inf)), bf16 x, dt, B, C; A, D, dt_bias in fp32:
            Mamba2-130M's layer (24 heads of 64, 128 states, 1 group) and Mamba2-780M's (48 heads),
            batch 4, L 2048 and 8192
    decode  mamba2_selective_state_update, one token, the state (b, h, p, n) updated in place,
            Mamba2-130M's layer, batch 64
    scan_train  the scan's forward and backward (every input's gradient, for a random dout),
            Mamba2-130M's layer, batch 4, L 2048 (benchmarks/gpu_check.py's training part)

    ours              compiler.compile of the module (the user's path)
    eager             the module in PyTorch (the chunked algorithm in fp32: einsums, an (L/256, 256, 256)
                      decay mask per head)
    torch.compile     Inductor on the same module (CUDA only)
    memory floor      x, dt, B, C read once and y written once (decode: the state read and written too)
                      at the copy bandwidth measured in this run
    matmul floor      the chunked algorithm's matmul FLOPs (C B^T and (.) X on the causal half of each
                      chunk, the chunk states and the off-diagonal term, 2 per multiply-add) at the bf16
                      matmul rate measured in this run; fwd+bwd: those of ours' backward kernels too
                      (five products on each chunk's causal half, five with the (p, n) states)
    fwd+bwd floors    memory: x, dt, B, C read twice, dout read and every gradient written once

Times in ms; ratios are peer / ours, so against a floor the ratio is the fraction of it we reach.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import compiler
from benchmarks.common import (Row, against_eager_and_inductor, bench_ms, first_call_s, measure_ceilings,
                               memory_floor_ms, run_configs)
from models.mamba2 import Mamba2Config

def _sizes(config: Mamba2Config) -> dict:
    return dict(heads=config.nheads, headdim=config.headdim, dstate=config.d_state, groups=config.ngroups)


SIZES = {"mamba2-130m": _sizes(Mamba2Config.mamba2_130m()), "mamba2-780m": _sizes(Mamba2Config.mamba2_780m()),
         "tiny": dict(heads=2, headdim=16, dstate=16, groups=1)}


def _hf():
    from transformers.models.mamba2 import modeling_mamba2  # the peers' module: transformers is a test extra

    return modeling_mamba2


class ChunkScan(nn.Module):
    """Mamba2Mixer's call of the chunked scan."""

    def __init__(self, chunk: int):
        super().__init__()
        self.chunk = chunk

    def forward(self, x, dt, A, B, C, D, dt_bias):
        return _hf().mamba2_chunk_scan(x, dt, A, B, C, self.chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                                       dt_limit=(0.0, math.inf))


class StateUpdate(nn.Module):
    """Mamba2Mixer's decode step (mamba2_scan_forward's recurrent form): the per-head dt, A, D and dt_bias
    expanded along the head dim, the state written in place."""

    def forward(self, state, x, dt, A, B, C, D, dt_bias):
        p, n = state.shape[-2:]
        return _hf().mamba2_selective_state_update(
            state, x, dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n), B, C,
            D[:, None].expand(-1, p), dt_bias=dt_bias[:, None].expand(-1, p), dt_softplus=True)


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """Scan rows (the issue's four), then decode, then fwd+bwd. headline: Mamba2-130M at L 2048 and
    Mamba2-780M at L 8192, and the decode step."""
    if quick:
        scans = [dict(op="scan", model="tiny", batch=1, seqlen=40, chunk=16)]
        decode = dict(op="decode", model="tiny", batch=2)
        return scans + [decode] + ([] if headline else training_grid(quick))
    scans = [dict(op="scan", model=model, batch=4, seqlen=length, chunk=256)
             for model in ("mamba2-130m", "mamba2-780m") for length in (2048, 8192)]
    decode = dict(op="decode", model="mamba2-130m", batch=64)
    return [scans[0], scans[3], decode] if headline else scans + [decode] + training_grid(quick)


def training_grid(quick: bool) -> list[dict]:
    """The scan's fwd+bwd at Mamba2-130M's size (benchmarks/gpu_check.py's training part runs it)."""
    if quick:
        return [dict(op="scan_train", model="tiny", batch=1, seqlen=40, chunk=16)]
    return [dict(op="scan_train", model="mamba2-130m", batch=4, seqlen=2048, chunk=256)]


def _parameters(heads: int, headdim: int, device) -> tuple:
    """A (h,), D (h,), dt_bias (h,) in fp32 at Mamba-2's scales (softplus(dt_bias) in [1e-3, 0.1])."""
    A = -torch.exp(torch.empty(heads, device=device).uniform_(0, math.log(16)))
    D = torch.randn(heads, device=device)
    dt_bias = torch.log(torch.expm1(torch.empty(heads, device=device).uniform_(1e-3, 0.1)))
    return A, D, dt_bias


def scan_inputs(config: dict, device, dtype) -> tuple:
    """(x, dt, A, B, C, D, dt_bias) as Mamba2Mixer passes them."""
    torch.manual_seed(0)
    sizes = SIZES[config["model"]]
    b, L, h, p, n, g = config["batch"], config["seqlen"], sizes["heads"], sizes["headdim"], sizes["dstate"], \
        sizes["groups"]
    A, D, dt_bias = _parameters(h, p, device)
    x = torch.randn(b, L, h, p, device=device, dtype=dtype)
    dt = 0.5 * torch.randn(b, L, h, device=device, dtype=dtype)
    B, C = (torch.randn(b, L, g, n, device=device, dtype=dtype) for _ in range(2))
    return x, dt, A, B, C, D, dt_bias


def decode_inputs(config: dict, device, dtype) -> tuple:
    """(state, x, dt, A, B, C, D, dt_bias), dt per (batch, head)."""
    torch.manual_seed(0)
    sizes = SIZES[config["model"]]
    b, h, p, n, g = config["batch"], sizes["heads"], sizes["headdim"], sizes["dstate"], sizes["groups"]
    A, D, dt_bias = _parameters(h, p, device)
    state = torch.randn(b, h, p, n, device=device, dtype=torch.float32)
    x = torch.randn(b, h, p, device=device, dtype=dtype)
    dt = 0.5 * torch.randn(b, h, device=device, dtype=dtype)
    B, C = (torch.randn(b, g, n, device=device, dtype=dtype) for _ in range(2))
    return state, x, dt, A, B, C, D, dt_bias


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def matmul_flops(config: dict) -> float:
    """2 x the multiply-adds of the chunked algorithm, per step and head: C B^T and its product with X
    on the causal half of the chunk (Q (n + p) / 2), the chunk state and the off-diagonal term (n p each)."""
    sizes = SIZES[config["model"]]
    chunk, n, p = config["chunk"], sizes["dstate"], sizes["headdim"]
    steps = config["batch"] * config["seqlen"] * sizes["heads"]
    return 2.0 * steps * (chunk * (n + p) / 2 + 2 * n * p)


def training_matmul_flops(config: dict) -> float:
    """matmul_flops plus ours' backward: per step and head, (3 n + 4 p) Q / 2 multiply-adds on the
    causal half of the chunk (C B^T and dy X^T twice each, dX, dB, dC) and 5 n p with the states
    (dstates, the state terms of y, dC, dX and dB)."""
    sizes = SIZES[config["model"]]
    chunk, n, p = config["chunk"], sizes["dstate"], sizes["headdim"]
    steps = config["batch"] * config["seqlen"] * sizes["heads"]
    return matmul_flops(config) + 2.0 * steps * (chunk * (3 * n + 4 * p) / 2 + 5 * n * p)


def _matmul_floor_ms(flops: float) -> float | None:
    rate = measure_ceilings().get("matmul_tflops")
    return flops / (rate * 1e12) * 1e3 if rate else None


def _fired(compiled) -> str:
    found = compiled.patterns.count("ssd_scan")
    return "" if found == 1 else f"ssd_scan fused {found} of 1; "


def _notes(compiled, capture_s: float | None) -> str:
    return f"{_fired(compiled)}ours' first call {'failed' if capture_s is None else f'{capture_s:.1f} s'}"


def measure_scan(config: dict, device, dtype) -> Row:
    args = scan_inputs(config, device, dtype)
    module = ChunkScan(config["chunk"])
    compiled = compiler.compile(ChunkScan(config["chunk"]))
    peers = {}
    with torch.no_grad():
        capture_s = first_call_s(lambda: compiled(*args))
        ours = bench_ms(lambda: compiled(*args))
        peers["eager"] = bench_ms(lambda: module(*args), warmup=2, rep=10)
        if device.type == "cuda":
            inductor = torch.compile(ChunkScan(config["chunk"]))
            peers["torch.compile"] = bench_ms(lambda: inductor(*args))
    x, dt, _, B, C = args[:5]
    peers["memory floor"] = memory_floor_ms(_nbytes([x, dt, B, C]) + _nbytes([x]))
    flops = matmul_flops(config)
    peers["matmul floor"] = _matmul_floor_ms(flops)
    return Row("ssd_scan", config, ours, peers, work={"flops": flops}, notes=_notes(compiled, capture_s))


def measure_decode(config: dict, device, dtype) -> Row:
    args = decode_inputs(config, device, dtype)
    compiled = compiler.compile(StateUpdate())
    ours, peer_ms = against_eager_and_inductor(compiled, StateUpdate, args, device)
    state, x = args[:2]
    moved = _nbytes([state, state, x, x]) + _nbytes(args[4:6])
    peer_ms["memory floor"] = memory_floor_ms(moved)
    return Row("ssd_scan", config, ours, peer_ms, work={"bytes": moved}, notes=_fired(compiled).rstrip("; "))


def _gradients(module, args: tuple, dout: torch.Tensor):
    """One forward and the gradients of every input for the output gradient dout."""
    return torch.autograd.grad(module(*args), args, dout)


def measure_scan_train(config: dict, device, dtype) -> Row:
    args = tuple(t.requires_grad_() for t in scan_inputs(config, device, dtype))
    x, dt, _, B, C = args[:5]
    dout = torch.randn_like(x)
    module = ChunkScan(config["chunk"])
    compiled = compiler.compile(ChunkScan(config["chunk"]))
    capture_s = first_call_s(lambda: _gradients(compiled, args, dout))
    ours = bench_ms(lambda: _gradients(compiled, args, dout))
    peers = {"eager": bench_ms(lambda: _gradients(module, args, dout), warmup=2, rep=10)}
    if device.type == "cuda":
        inductor = torch.compile(ChunkScan(config["chunk"]))
        peers["torch.compile"] = bench_ms(lambda: _gradients(inductor, args, dout))
    peers["memory floor"] = memory_floor_ms(2 * _nbytes([x, dt, B, C]) + _nbytes([x, dout]) + _nbytes([x, dt, B, C]))
    flops = training_matmul_flops(config)
    peers["matmul floor"] = _matmul_floor_ms(flops)
    notes = _notes(compiled, capture_s) + ("; the backward fell back to PyTorch" if "ran in PyTorch" in
                                           compiled.report() else "")
    return Row("ssd_scan", config, ours, peers, work={"flops": flops}, notes=notes)


MEASURE = {"scan": measure_scan, "decode": measure_decode, "scan_train": measure_scan_train}


def run(quick: bool, device: torch.device, headline: bool = False, training: bool = False) -> list[Row]:
    """The suite's rows; headline: gpu_check's forward configs; training: only its fwd+bwd ones."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = training_grid(quick) if training else grid(quick, headline)
    return run_configs("ssd_scan", configs, lambda config: MEASURE[config["op"]](config, device, dtype))

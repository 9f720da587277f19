"""Long and short convolutions on FlashFFTConv's grid, and the H3 / Hyena models, ours against the peers.

    long    B 64, H 768, L 256..64K, bf16 (fewer rows from 32K on, so eager's fp32 spectra fit):
            out = irfft(rfft(u, n=2L) * rfft(k, n=2L), n=2L)[..., :L] + u * D   (H3's fftconv_ref)
    short   the same grid: silu(conv1d(x, w, b, padding=3, groups=H)[..., :L]), K = 4 (Mamba's)
    model   H3-125M and Hyena-150M forward, batch 8, L 2K and 8K

    ours           compiler.compile of the module (the user's path)
    eager          the module in PyTorch: torch.fft for the long convolution, F.conv1d for the short one
    torch.compile  Inductor on the same module (it sends FFTs back to eager)

Rate: the bytes a fused kernel must move at least, u in and y out, per second.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import compiler
from benchmarks.common import Row, bench_ms, run_configs
from models import h3, hyena
from models.h3 import fftconv_ref

FULL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
ROWS_AT = {32768: 32, 65536: 16}  # batch where 64 rows of fp32 spectra would not fit in 80 GB
HEADLINE = {False: {"long": (2048, 16384), "short": (8192,)},  # H3's length and a Hyena-long one
            True: {"long": (64, 256), "short": (256,)}}  # by quick
MODELS = {
    "h3-tiny": lambda batch, length: h3.example(h3.H3Config.tiny(), batch, length),
    "hyena-tiny": lambda batch, length: hyena.example(hyena.HyenaConfig.tiny(), batch, length),
    "h3-125m": h3.h3_125m,
    "hyena-150m": hyena.hyena_150m,
}


class FFTConv(nn.Module):
    """H3's long convolution with a decaying filter k (H, L) and skip weights D (H,)."""

    def __init__(self, channels: int, seqlen: int):
        super().__init__()
        rates = torch.linspace(2.0, 20.0, channels)[:, None] / seqlen
        self.k = nn.Parameter(torch.randn(channels, seqlen) * torch.exp(-rates * torch.arange(seqlen)))
        self.D = nn.Parameter(torch.randn(channels))

    def forward(self, u):
        return fftconv_ref(u, self.k.float(), self.D)


class ShortConv(nn.Module):
    """Mamba's short convolution: silu(conv1d(x, padding=K-1, groups=H)[..., :L])."""

    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, width, padding=width - 1, groups=channels)

    def forward(self, x):
        return torch.nn.functional.silu(self.conv(x)[..., :x.shape[-1]])


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """headline (benchmarks/gpu_check.py): the convolutions at HEADLINE's lengths, no models."""
    if quick:
        convs = [dict(op=op, batch=1, channels=8, seqlen=length) for op in ("long", "short") for length in (64, 256)]
        models = [dict(op="model", model=name, batch=1, seqlen=64) for name in ("h3-tiny", "hyena-tiny")]
    else:
        convs = [dict(op=op, batch=ROWS_AT.get(length, 64), channels=768, seqlen=length)
                 for op in ("long", "short") for length in FULL_LENGTHS]
        models = [dict(op="model", model=name, batch=8, seqlen=length)
                  for name in ("h3-125m", "hyena-150m") for length in (2048, 8192)]
    if headline:
        return [config for config in convs if config["seqlen"] in HEADLINE[quick][config["op"]]]
    return convs + models


def _workload(config: dict, device, dtype) -> tuple[nn.Module, tuple, dict, str]:
    """(module in dtype on device, its inputs, work for the rate, the pattern ours must fuse)."""
    if config["op"] == "model":
        model, (ids,) = MODELS[config["model"]](config["batch"], config["seqlen"])
        return model.to(device, dtype), (ids.to(device),), {}, "long_conv"
    shape = (config["batch"], config["channels"], config["seqlen"])
    module = FFTConv(*shape[1:]) if config["op"] == "long" else ShortConv(shape[1])
    u = torch.randn(shape, device=device, dtype=dtype) * 0.1
    work = {"bytes": 2 * u.numel() * u.element_size()}
    return module.to(device, dtype).eval(), (u,), work, "long_conv" if config["op"] == "long" else "short_conv"


def peers(module: nn.Module, device) -> dict:
    if device.type != "cuda":
        return {"eager": module}
    return {"eager": module, "torch.compile": torch.compile(module)}


def measure(config: dict, device, dtype) -> Row:
    module, args, work, pattern = _workload(config, device, dtype)
    compiled = compiler.compile(module)
    with torch.no_grad():
        ours = bench_ms(lambda: compiled(*args))
        peer_ms = {name: bench_ms(lambda fn=fn: fn(*args)) for name, fn in peers(module, device).items()}
    notes = "" if pattern in compiled.patterns else f"{pattern} pass did not fire"
    return Row("long_conv", config, ours, peer_ms, work=work, notes=notes)


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return run_configs("long_conv", grid(quick, headline), lambda config: measure(config, device, dtype))

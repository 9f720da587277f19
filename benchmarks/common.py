"""Shared benchmark plumbing: timing, hardware ceilings, result records and writers.

Timing uses triton.testing.do_bench (median of many runs, L2 flushed) on CUDA and a plain
wall-clock loop on the CPU (only for `--quick` smoke runs of the harness itself).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    """One measured configuration: our time and each peer's, in milliseconds."""

    suite: str
    config: dict
    ours_ms: float | None
    peers_ms: dict[str, float | None] = field(default_factory=dict)
    work: dict = field(default_factory=dict)  # flops and/or bytes, for rates
    notes: str = ""

    def ratios(self) -> dict[str, float | None]:
        """Peer time / our time: above 1 means we are faster."""
        if not self.ours_ms:
            return {name: None for name in self.peers_ms}
        return {name: (peer / self.ours_ms if peer else None) for name, peer in self.peers_ms.items()}


def bench_ms(fn, *, warmup: int = 25, rep: int = 100) -> float | None:
    """Median milliseconds per call of `fn()`, or None when it raises (peer not available)."""
    try:
        if torch.cuda.is_available():
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    except Exception:  # a peer that cannot run this config is reported as missing
        return None


def measure_ceilings() -> dict[str, float]:
    """bf16 matmul TFLOP/s (8192^3) and device-to-device copy TB/s (1 GiB), measured now."""
    if not torch.cuda.is_available():
        return {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_ms = bench_ms(lambda: a @ b)
    source = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    copy_ms = bench_ms(lambda: target.copy_(source))
    return {
        "matmul_tflops": 2 * 8192**3 / (matmul_ms * 1e-3) / 1e12,
        "copy_tbps": 2 * source.numel() * 2 / (copy_ms * 1e-3) / 1e12,
    }


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def rows_payload(rows: list[Row]) -> list[dict]:
    return [dict(asdict(row), ratios=row.ratios()) for row in rows]

"""The main job: compile every bundled model, check it against eager, and report.

For each model: what matched, the kernels generated, the max error against eager fp32
(and against the tolerance rule's bound), and, when a GPU is present, eager vs compiled
time. Exits non-zero if any model's outputs are out of tolerance.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

import compiler
from models import dejavu, gpt, h3, hyena, mamba, mamba2

def sparsified_gpt():
    """Our dense tiny GPT made contextually sparse (25% of MLP neurons) by compiler.sparsify."""
    model, args = gpt.tiny_naive()
    calibration = [gpt.tiny_naive(seed=seed)[1] for seed in range(1, 5)]
    print(compiler.sparsify(model, calibration, density=0.25, progress=False))
    return model, args


MODELS: dict[str, Callable] = {
    "GPT tiny, naive attention (nanoGPT style)": gpt.tiny_naive,
    "GPT tiny, SDPA attention, GQA 4:2": gpt.tiny_sdpa_gqa,
    "GPT tiny, naive attention, MQA": gpt.tiny_naive_mqa,
    "DejaVu tiny, sparse MLP gathered (W1[idx], W2[:, idx])": dejavu.tiny_gathered,
    "DejaVu tiny, sparse MLP masked (fc2(act(fc1(x)) * mask))": dejavu.tiny_masked,
    "GPT tiny made sparse by compiler.sparsify (dense MLPs -> DejaVu predictors)": sparsified_gpt,
    "H3 tiny, FFT long convolutions (shift and diagonal SSM kernels, gated)": h3.tiny,
    "Hyena tiny, implicit long filter by FFT, short depthwise conv, order-2 gating": hyena.tiny,
    "Mamba tiny, selective scan as a Python loop (selective_scan_ref)": mamba.tiny,
    "Mamba-2 block tiny, chunked SSD (mamba_ssm's ssd_minimal_discrete)": mamba2.tiny,
}
TOLERANCE = 1e-4


def _time(fn, args, repeats: int = 10) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def check_model(title: str, factory: Callable) -> bool:
    print(f"\n== {title}")
    model, args = factory()
    if torch.cuda.is_available():
        model, args = model.cuda(), tuple(a.cuda() for a in args)
    compiled = compiler.compile(model)
    with torch.no_grad():
        started = time.perf_counter()
        ours = compiled(*args)
        first_call = time.perf_counter() - started
        eager = model(*args)
        error = (ours.double() - eager.double()).abs().max().item()
        print(compiled.report())
        for kernel in compiled.kernels:
            print(f"  kernel {kernel.name} -> {kernel.path}")
        ok = error <= TOLERANCE
        print(f"  max |compiled - eager| = {error:.2e} ({'ok' if ok else 'OUT OF TOLERANCE'}), "
              f"first call (capture + compile) {first_call:.1f} s")
        if torch.cuda.is_available():
            print(f"  eager {_time(model, args):.3f} ms, compiled {_time(compiled, args):.3f} ms")
    return ok


def run_demo() -> int:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    print(f"flashfx demo on {device}")
    results = [check_model(title, factory) for title, factory in MODELS.items()]
    print(f"\n{sum(results)}/{len(results)} models within tolerance")
    return 0 if all(results) else 1

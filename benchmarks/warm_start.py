"""Warm start: a new process's compile + first call with a warm cache, against eager's first call.

Each measurement runs in a fresh Python process (so nothing is warm in memory), after one
warming process has filled the flashfx cache (and Inductor's, for the torch.compile peer):

    eager           first call of the uncompiled model
    flashfx         compiler.compile(model) + first call, warm kernel/autotune cache
    torch.compile   torch.compile(model) (Inductor, default) + first call, warm Inductor cache

The row also records how many autotuning benchmarks the warm flashfx process ran (target 0).
Mamba's scan loop is kept rolled (compiler.register_rolled), so capture does not trace L steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from benchmarks.common import Row

PROBE = r"""
import json, sys, time, importlib, torch
import compiler
from runtime.autotune import default_autotuner
module_name, factory_name, how, device = sys.argv[1:5]
model, args = getattr(importlib.import_module(module_name), factory_name)()
model, args = model.to(device), tuple(a.to(device) for a in args)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
sync()
start = time.perf_counter()
with torch.no_grad():
    runner = {"eager": lambda m: m, "flashfx": compiler.compile, "torch.compile": torch.compile}[how](model)
    runner(*args)
sync()
print(json.dumps({"ms": (time.perf_counter() - start) * 1e3, "benchmarks": default_autotuner().benchmarks_run}))
"""

MODELS = {
    "quick": [("models.gpt", "tiny_sdpa_gqa"), ("benchmarks.warm_start", "mamba_tiny")],
    "full": [("models.gpt", "gpt2_small"), ("benchmarks.warm_start", "mamba_130m")],
}


def _rolled_mamba(sizes, batch: int, length: int):
    from benchmarks.ssm_scan import rolled_scan
    from models import mamba

    mamba.selective_scan_ref = rolled_scan()  # this probe process only
    return mamba.example(sizes, batch, length)


def mamba_tiny():
    from models.mamba import MambaConfig

    return _rolled_mamba(MambaConfig.tiny(), 1, 64)


def mamba_130m():
    from models.mamba import MambaConfig

    return _rolled_mamba(MambaConfig.mamba_130m(), 1, 2048)


def _probe(factory: tuple[str, str], how: str, device: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *factory, how, device],
                            capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool, device: torch.device) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FLASHFX_CACHE_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
               "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        for factory in MODELS["quick" if quick else "full"]:
            peers = ["eager"] + ([] if device.type == "cpu" else ["torch.compile"])
            for how in ["flashfx"] + peers[1:]:
                _probe(factory, how, device.type, env)  # warm the caches
            flashfx = _probe(factory, "flashfx", device.type, env)
            timings = {how: _probe(factory, how, device.type, env)["ms"] for how in peers}
            overhead = flashfx["ms"] - timings["eager"]
            rows.append(Row("warm_start", {"model": ":".join(factory)}, flashfx["ms"], timings,
                            notes=f"overhead over eager first call {overhead:.0f} ms; "
                                  f"autotune benchmarks in warm process: {flashfx['benchmarks']}"))
    return rows

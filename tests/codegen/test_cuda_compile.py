"""Every family's kernels compile for an H100 (sm_90) without a GPU.

Triton's interpreter, which runs the CPU tests, accepts programs a GPU compile rejects (tiles
too small for tl.dot, layouts Triton cannot lower, shared memory beyond the device's). Here
tests/codegen/cuda_compile_grid.py compiles each family's kernels at the sizes and default
configs the GPU runs, in a fresh process that imports Triton without the interpreter, and
reports what ptxas says they use.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.codegen.cuda_compile_grid import FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def compile_records(family: str, tmp_path: Path) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), FLASHFX_CACHE_DIR=str(tmp_path / "flashfx"),
               TRITON_CACHE_DIR=str(tmp_path / "triton"))
    result = subprocess.run([sys.executable, "-m", "tests.codegen.cuda_compile_grid", family],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records, result.stderr[-3000:]
    return records


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_compile_for_h100(family, tmp_path):
    records = compile_records(family, tmp_path)
    failures = [f"{record['case']}:\n{record['error']}" for record in records if "error" in record]
    assert not failures, "\n".join(failures)
    too_big = [(record["case"], record["shared_bytes"]) for record in records if not record["fits"]]
    assert not too_big, f"shared memory beyond the H100's 227 KiB: {too_big}"
    if family in ("attention", "attention_backward"):  # default_config keeps tiles within a thread's registers
        spilled = [(record["case"], record["spill_bytes"]) for record in records if record["spill_bytes"]]
        assert not spilled, f"default configs spill registers: {spilled}"
        # 16-bit tiles run on Hopper's wgmma; the backward's head dim 256 keys tiles too short for it
        half = [record for record in records if "float32" not in record["case"]
                and not (family == "attention_backward" and "d256" in record["case"])]
        assert all(record["tensor_cores"] == "wgmma" for record in half), "16-bit tiles run on Hopper's wgmma"
    if family == "attention_decode":  # K/V blocks stream through cp.async stages
        assert all(record["pipelined"] for record in records if record["name"].startswith("attention_decode"))

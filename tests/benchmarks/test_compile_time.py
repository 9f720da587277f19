"""benchmarks/compile_time.py runs on the CPU: Hugging Face Mamba's first call, its scan rolled and as written."""
from __future__ import annotations

import pytest
import torch

from benchmarks import compile_time

pytest.importorskip("transformers")


def test_a_config_times_both_forms(monkeypatch):
    monkeypatch.setattr(compile_time, "warm_up", lambda *args: None)  # the kernels' JIT is not what this checks
    config = dict(model="hf-mamba", scan="loop", layers=1, seqlen=8)
    row = compile_time.measure(config, quick=True, device=torch.device("cpu"), dtype=torch.float32)
    assert row.ours_ms > 0 and row.peers_ms["as written"] > 0, row
    assert row.notes.startswith("1 scans rolled; steady call"), row.notes
    assert len(compile_time.grid(quick=True)) == 8

"""benchmarks/end_to_end.py runs on the CPU (--quick sizes): every model, each fusing every layer's op."""
from __future__ import annotations

import torch

from benchmarks import end_to_end


def test_every_model_runs_and_fuses_every_layer():
    rows = end_to_end.run(quick=True, device=torch.device("cpu"))
    assert [row.config["model"] for row in rows] == list(end_to_end.MODELS)
    for row in rows:
        assert row.ours_ms and row.peers_ms["eager"], row
        assert row.notes.startswith("first calls:"), row.notes  # no "k of n ops fused" before it

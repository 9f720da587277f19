"""benchmarks/host_overhead.py runs on the CPU and times every family's dispatch path, kernels stubbed,
beside its reference rows."""
from __future__ import annotations

import torch

import compiler
from benchmarks.host_overhead import markdown, rows
from models import gpt


def test_every_family_is_timed():
    table = rows(calls=2)
    families = {op.split(" ")[0] for model, op, *_ in table if model != "reference"}
    assert {"attention", "long_conv", "short_conv", "ssm_scan", "ssd_scan", "sparse_mlp"} <= families
    assert [op for model, op, *_ in table if model == "reference"] == ["custom op returning its input", "torch.empty"]
    assert all(0 < fastest <= median for _, _, fastest, median in table)
    assert markdown(table).count("\n") == len(table) + 1
    model, (ids,) = gpt.tiny_naive(batch=1, length=16)  # the kernels launch again afterwards
    with torch.no_grad():
        torch.testing.assert_close(compiler.compile(model)(ids), model(ids), rtol=1e-4, atol=1e-4)

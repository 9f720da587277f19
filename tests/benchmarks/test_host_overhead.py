"""benchmarks/host_overhead.py runs on the CPU and times every family's dispatch path, with and without
its launcher."""
from __future__ import annotations

import torch

import compiler
from benchmarks.host_overhead import markdown, rows
from models import gpt


def test_every_family_is_timed_both_ways():
    table = rows(calls=2)
    families = {op.split(" ")[0] for _, op, *_ in table}
    assert {"attention", "long_conv", "short_conv", "ssm_scan", "sparse_mlp"} <= families
    assert all(module > 0 and custom > 0 and launcher > 0 for _, _, module, custom, launcher in table)
    assert markdown(table).count("\n") == len(table) + 1
    model, (ids,) = gpt.tiny_naive(batch=1, length=16)  # the kernels launch again afterwards
    with torch.no_grad():
        torch.testing.assert_close(compiler.compile(model)(ids), model(ids), rtol=1e-4, atol=1e-4)

"""The spellings the ssm_scan pass reads: select, stack/cat, exp, softplus, silu, sum."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ir.canonicalize import canonicalize
from ir.from_fx import from_fx


def canonical_ops(module: nn.Module, *args) -> list:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(module, backend=backend, dynamic=False, fullgraph=True)(*args)
    return [(node.op, node.attrs) for node in canonicalize(from_fx(graphs[0])) if node.op not in ("placeholder", "output")]


class Spellings(nn.Module):
    def forward(self, x):
        first, last, middle = x[:, 0], x[..., -1], torch.select(x, 1, 2)
        joined = torch.stack([first, middle], dim=-1) + torch.cat([last, last[:, :1]], dim=1).unsqueeze(-1)
        return F.silu(torch.exp(joined)).sum(-1), F.softplus(x).sum(dim=(0, 2), keepdim=True)


def test_scan_spellings_are_canonical():
    ops = canonical_ops(Spellings(), torch.randn(2, 3, 4))
    assert ("select", {"dim": 1, "index": 0}) in ops
    assert ("select", {"dim": 2, "index": 3}) in ops
    assert ("select", {"dim": 1, "index": 2}) in ops
    assert ("stack", {"dim": 2}) in ops and ("cat", {"dim": 1}) in ops
    assert ("exp", {}) in ops and ("silu", {}) in ops
    assert ("softplus", {"beta": 1.0, "threshold": 20.0}) in ops
    assert ("sum", {"dim": (2,), "keepdim": False, "dtype": None}) in ops
    assert ("sum", {"dim": (0, 2), "keepdim": True, "dtype": None}) in ops


def test_in_place_silu_and_slices_stay_opaque():
    class Opaque(nn.Module):
        def forward(self, x):
            return F.silu(x[:, 1:3].clone(), inplace=True)

    ops = canonical_ops(Opaque(), torch.randn(2, 4))
    assert all(op not in ("select", "silu") for op, _ in ops)

"""The spellings Mamba-2's SSD is written in: einsums of any arity and notation, cumsum, clamp, and
segment sums (Hugging Face's segment_sum, mamba_ssm's segsum with and without einops, the
difference of running sums), each read as one canonical form and lowered back unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ir.canonicalize import canonicalize
from ir.from_fx import from_fx
from ir.to_fx import segment_sum, to_fx
from ir.verify import verify
from models import mamba2
from tests.ir.test_canonicalize import capture


def canonical(module: nn.Module, *args):
    graph = canonicalize(from_fx(capture(module, *args)))
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    return graph


def assert_round_trip(graph, module, *args):
    for ours, eager in zip(to_fx(graph)(*args), module(*args)):
        torch.testing.assert_close(ours, eager)


class Einsums(nn.Module):
    """Ellipsis, implicit output, and the 4- and 3-operand einsums of mamba_ssm's SSD."""

    def forward(self, x, y, C, B, L, X):
        batched = torch.einsum("...ij,...jk", x, y)
        diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
        states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, L[..., 0], X)
        return batched, diag, states


def einsum_args():
    b, c, l, h, n, p = 2, 3, 4, 2, 5, 3
    return (torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(b, c, l, h, n), torch.randn(b, c, l, h, n),
            torch.randn(b, h, c, l, l), torch.randn(b, c, l, h, p))


def test_einsums_become_two_operand_products():
    args = einsum_args()
    graph = canonical(Einsums(), *args)
    # the broadcast products of the split (C B^T times the mask, B times the decay) became broadcast
    # muls (no index summed), every contraction a matmul: ...ij,...jk, C B^T, (.) X, B X
    assert not [node for node in graph if node.op == "einsum"]
    assert [node.op for node in graph].count("matmul") == 4
    assert [node.op for node in graph].count("mul") >= 2
    assert_round_trip(graph, Einsums(), *args)


@pytest.mark.parametrize("equation, ranks, explicit", [
    ("...ij,...jk", [3, 3], "Aij,Ajk->Aik"),
    ("bij, bjk -> bik", [3, 3], "bij,bjk->bik"),
    ("i...,i...->...", [3, 1], "iAB,i->AB"),
    ("ij,jk", [2, 2], "ij,jk->ik"),
    ("ij,jk->ik", [2, 3], None),
])
def test_einsum_equations_are_made_explicit(equation, ranks, explicit):
    from ir.spellings import _explicit_equation

    assert _explicit_equation(equation.replace(" ", ""), ranks) == explicit


class RunningSums(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1), x.cumsum(1, dtype=torch.float64), x.clamp(min=0.0), torch.clip(x, -1, 1)


def test_cumsum_and_clamp_spellings():
    graph = canonical(RunningSums(), torch.randn(2, 3))
    found = [(node.op, node.attrs) for node in graph if node.op in ("cumsum", "clamp")]
    assert found == [("cumsum", {"dim": 1, "dtype": None}), ("cumsum", {"dim": 1, "dtype": torch.float64}),
                     ("clamp", {"min": 0.0, "max": None}), ("clamp", {"min": -1, "max": 1})]


def _hf_segment_sum():
    module = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    return module.segment_sum


def _unstable_segsum(x):
    """mamba_ssm's segsum_unstable: a difference of running sums."""
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(x.size(-1), x.size(-1), dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def _positive_masks(x):
    """The masks written the other way round: torch.where keeps the lower triangle."""
    T = x.size(-1)
    lower = torch.ones(T, T, dtype=torch.bool).tril()
    columns = torch.where(lower.tril(-1), x[..., None].expand(*x.shape, T), 0.0)
    return torch.where(lower, columns.cumsum(-2), float("-inf"))


SEGMENT_SUMS = {"hf": _hf_segment_sum, "mamba_ssm": lambda: mamba2.segsum, "unstable": lambda: _unstable_segsum,
                "where": lambda: _positive_masks}
if mamba2.einops is not None:
    SEGMENT_SUMS["einops"] = lambda: mamba2._segsum_einops


class Decay(nn.Module):
    def __init__(self, segment_sum):
        super().__init__()
        self.segment_sum = segment_sum

    def forward(self, a):
        return torch.exp(self.segment_sum(a * 0.5))


@pytest.mark.parametrize("spelling", sorted(SEGMENT_SUMS))
def test_segment_sums_become_segsum(spelling):
    module, a = Decay(SEGMENT_SUMS[spelling]()), -torch.rand(2, 3, 7)
    graph = canonical(module, a)
    (segsum,) = [node for node in graph if node.op == "segsum"]
    assert graph.node(segsum.inputs[0]).op == "mul" and not any(node.op == "cumsum" for node in graph)
    torch.testing.assert_close(to_fx(graph)(a)[0], module(a))


class NotSegmentSums(nn.Module):
    """Near misses: the diagonal zeroed before the cumsum (sums from s, not s + 1), the upper fill not
    -inf, and a mask that depends on an input (not a constant)."""

    def forward(self, x, keep):
        T = x.size(-1)
        columns = x[..., None].expand(*x.shape, T)
        ones = torch.ones(T, T, dtype=torch.bool)
        inclusive = columns.masked_fill(~ones.tril(0), 0).cumsum(-2).masked_fill(~ones.tril(0), -torch.inf)
        zero_filled = columns.masked_fill(~ones.tril(-1), 0).cumsum(-2).masked_fill(~ones.tril(0), 0.0)
        runtime = columns.masked_fill(~ones.tril(-1), 0).cumsum(-2).masked_fill(~keep, -torch.inf)
        return inclusive, zero_filled, runtime


def test_near_segment_sums_stay_as_written():
    x, keep = torch.randn(2, 5), torch.ones(5, 5, dtype=torch.bool).tril()
    graph = canonical(NotSegmentSums(), x, keep)
    assert not any(node.op == "segsum" for node in graph)
    assert_round_trip(graph, NotSegmentSums(), x, keep)


def test_segment_sum_lowering_matches_its_definition():
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = torch.full((3, 6, 6), -torch.inf, dtype=torch.float64)
    for i in range(6):
        for j in range(i + 1):
            expected[:, i, j] = x[:, j + 1:i + 1].sum(-1)
    torch.testing.assert_close(segment_sum(x), expected)

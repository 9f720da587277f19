"""Import from fx, canonicalisation, pattern matching, verification and lowering."""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ir.canonicalize import canonicalize
from ir.from_fx import from_fx
from ir.pattern import Any, Mismatch, Op, Skip, match
from ir.to_fx import to_fx
from ir.verify import verify


def capture(module: nn.Module, *args) -> torch.fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend, dynamic=False, fullgraph=True)(*args)
    return graphs[0]


class Spellings(nn.Module):
    def forward(self, q, k, v):
        a = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        kk = k[:, :, None].expand(2, 2, 3, 5, 4).reshape(2, 6, 5, 4)
        b = q.repeat_interleave(1, dim=1) @ kk.transpose(-1, -2)[:, :2]
        return torch.nn.functional.dropout(a, 0.1, training=False).float() + b + v.sum()


def imported(module, *args):
    gm = capture(module, *args)
    return gm, canonicalize(from_fx(gm))


def test_canonical_ops_and_round_trip():
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    gm, graph = imported(Spellings(), q, k, v)
    ops = [node.op for node in graph]
    assert "einsum" in ops and "matmul" in ops  # einsum rewritten next to the original
    assert "repeat_kv" in ops
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    assert "dropout" not in [node.op for node in graph]
    assert not any(node.op == "einsum" for node in graph)
    lowered = to_fx(graph)
    torch.testing.assert_close(lowered(q, k, v)[0], Spellings()(q, k, v))


def test_silu_written_out_is_silu():
    class Swish(nn.Module):
        def forward(self, x, y):
            return x * torch.sigmoid(x) + y.sigmoid() * y + x * torch.sigmoid(y)  # the last is no SiLU

    x, y = torch.randn(3, 7), torch.randn(3, 7)
    _, graph = imported(Swish(), x, y)
    graph.eliminate_dead_code(lambda node: True)
    assert [node.op for node in graph].count("silu") == 2 and "mul" in [node.op for node in graph]
    torch.testing.assert_close(to_fx(graph)(x, y)[0], Swish()(x, y))


def test_div_by_scalar_is_a_scale():
    class Scaled(nn.Module):
        def forward(self, x):
            return x / 4.0

    _, graph = imported(Scaled(), torch.randn(3))
    (node,) = [n for n in graph if n.op == "mul"]
    assert node.attrs["scalar"] == 0.25


def test_unnormalised_calls_named_like_ir_ops_keep_their_meaning():
    """A rounding div or an alpha add stays an opaque call (JetMoE's routing); the rules of the IR's
    div and add never see it."""
    class Rounding(nn.Module):
        def forward(self, x):
            return torch.div(x, 4, rounding_mode="floor") + torch.add(x, x, alpha=2) / 4.0

    x = torch.randn(3, 5) * 10
    _, graph = imported(Rounding(), x)
    assert sorted(node.attrs["target"] for node in graph if node.op == "torch") == ["add", "div"]
    torch.testing.assert_close(to_fx(graph)(x)[0], Rounding()(x))


class AddMatmul(nn.Module):
    """addmm (GPT-2's Conv1D), baddbmm with beta/alpha as keywords and as a method (BLOOM), mm."""

    def forward(self, bias, x, w, scores, q, k):
        projected = torch.addmm(bias, x, w)
        scaled = scores.baddbmm(batch1=q, batch2=k, beta=0.5, alpha=0.25)
        skipped = torch.baddbmm(scores, q, k, beta=0.0)
        return projected + torch.mm(x, w), scaled, skipped


def test_addmm_family_becomes_matmul_scale_and_add():
    args = (torch.randn(6), torch.randn(3, 4), torch.randn(4, 6), torch.randn(2, 3, 5), torch.randn(2, 3, 4),
            torch.randn(2, 4, 5))
    _, graph = imported(AddMatmul(), *args)
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    ops = [node.op for node in graph]
    assert "addmm" not in ops and ops.count("matmul") == 4
    assert sorted(node.attrs["scalar"] for node in graph if node.op == "mul") == [0.25, 0.5]
    for ours, eager in zip(to_fx(graph)(*args), AddMatmul()(*args)):
        torch.testing.assert_close(ours, eager)


class FilledBuffers(nn.Module):
    """Buffers filled slice by slice in a loop: one fully along its last dim (Ellipsis and negative
    indices, in any order), one read before it is full, one of another dtype than its slices, one
    left partly unwritten; and a select among unit dims, x[:, None, :, 1]."""

    def forward(self, x):
        full = torch.empty_like(x)
        for t in (3, 0, 2, 1):
            full[..., t - 4 if t % 2 else t] = torch.sin(x[:, :, t])
        early = x.new_zeros(2, 4)
        early[0] = x[0, 0]
        peek = early.sum()
        early[1] = x[1, 0]
        wider = torch.zeros(2, 4, dtype=torch.float64)
        wider[0], wider[1] = x[0, 1], x[1, 1]
        part = torch.zeros(3, 2, 3, 4)
        part[0], part[2] = x, x
        return full + peek, early, wider, part, x[:, None, :, 1]


def test_filled_buffers_become_stacks():
    x = torch.randn(2, 3, 4)
    _, graph = imported(FilledBuffers(), x)
    graph.eliminate_dead_code(lambda node: not node.writes)
    verify(graph)
    stacks = [node for node in graph if node.op == "stack"]
    assert len(stacks) == 1 and stacks[0].attrs["dim"] == 2 and len(stacks[0].inputs) == 4
    assert sum(node.attrs.get("target") == "assign" for node in graph) == 6  # early, wider, part as written
    unsqueezed = [node for node in graph if node.op == "reshape" and graph.node(node.inputs[0]).op == "select"]
    assert [graph.node(node.inputs[0]).attrs for node in unsqueezed] == [{"dim": 2, "index": 1}]
    for ours, eager in zip(to_fx(graph)(x), FilledBuffers()(x)):
        torch.testing.assert_close(ours, eager)


class ZeroPadded(nn.Module):
    """Zero padding spelled with cat: causal left padding, both sides, and a cat that pads with zeros
    of another dtype (promoting the result), which stays a cat."""

    def forward(self, x):
        left = torch.cat([torch.zeros(2, 3, 2), x], dim=-1)
        both = torch.cat((x.new_zeros(1, 3, 4), x, torch.zeros_like(x)), dim=0)
        promoted = torch.cat([torch.zeros(2, 3, 1, dtype=torch.float64), x], dim=2)
        return left, both, promoted


def test_concatenated_zeros_become_padding():
    x = torch.randn(2, 3, 4)
    _, graph = imported(ZeroPadded(), x)
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    assert sorted(node.attrs["pad"] for node in graph if node.op == "pad") == [(0, 0, 0, 0, 1, 2), (2, 0)]
    assert [node.op for node in graph].count("cat") == 1
    for ours, eager in zip(to_fx(graph)(x), ZeroPadded()(x)):
        torch.testing.assert_close(ours, eager)


class MetadataReads(nn.Module):
    """y read for its shape or dtype alone: mask.expand_as(y), x.view_as(y), x.type_as(y)."""

    def forward(self, x, mask, y):  # in the order of first use: Dynamo's placeholders follow it
        return x.masked_fill(mask.expand_as(y), 0.0).view_as(y) + x.type_as(y)


def test_reads_of_shape_or_dtype_alone_drop_the_tensor():
    x, mask, y = torch.randn(2, 3, 4), torch.rand(2, 1, 1) < 0.5, torch.randn(2, 3, 4, dtype=torch.float64)
    _, graph = imported(MetadataReads(), x, mask, y)
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    (y_node,) = [node for node in graph.placeholders() if node.name.endswith("y_")]
    assert graph.users(y_node.name) == []  # the expand, the view and the cast no longer read y
    torch.testing.assert_close(to_fx(graph)(x, mask, y)[0], MetadataReads()(x, mask, y))


class FullSlices(nn.Module):
    """x[:, :L] with L the dim's length (mamba2-minimal's y[:, :seqlen]); a real cut and a strided one stay."""

    def forward(self, x):
        return x[:, : x.shape[1]] * 2, x[..., :3] + x[:, 0:4:2].sum(), x.narrow(-1, 0, 4) + 1


def test_slices_keeping_the_whole_dim_are_dropped():
    x = torch.randn(2, 4, 4)
    _, graph = imported(FullSlices(), x)
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    assert sorted((node.attrs["stop"], node.attrs["step"]) for node in graph if node.op == "slice") == [(3, 1), (4, 2)]
    for ours, eager in zip(to_fx(graph)(x), FullSlices()(x)):
        torch.testing.assert_close(ours, eager)


class CutAfterTranspose(nn.Module):
    """silu(conv1d(x).transpose(1, 2)[:, :L]): the causal cut and the SiLU after the transpose back
    (mamba2-minimal)."""

    def forward(self, x, w):
        return F.silu(F.conv1d(x, w, padding=3, groups=3).transpose(1, 2)[:, :x.shape[-1]]) * 2


def test_a_cut_and_silu_after_a_transpose_of_a_conv_move_before_it():
    x, w = torch.randn(2, 3, 10), torch.randn(3, 1, 4)
    _, graph = imported(CutAfterTranspose(), x, w)
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    (cut,) = [node for node in graph if node.op == "slice"]
    assert graph.node(cut.inputs[0]).op == "conv1d" and (cut.attrs["dim"], cut.attrs["stop"]) == (2, 10)
    (activated,) = graph.users(cut.name)
    assert activated.op == "silu" and [user.op for user in graph.users(activated.name)] == ["permute"]
    torch.testing.assert_close(to_fx(graph)(x, w)[0], CutAfterTranspose()(x, w))


class WrittenOutSoftmaxes(nn.Module):
    """exp(x - rowmax) / sum over the last dim, the max as amax, max().values and max()[0]; and two
    that are not softmax: no max subtracted, a max over another dim."""

    def forward(self, s):
        a = torch.exp(s - s.amax(-1, keepdim=True))
        b = (s - s.max(dim=-1, keepdim=True).values).exp()
        c = torch.exp(s - torch.max(s, 2, True)[0])
        unshifted, other = s.exp(), torch.exp(s - s.amax(1, keepdim=True))
        return [t / t.sum(-1, keepdim=True) for t in (a, b, c, unshifted, other)]


def test_written_out_softmax_becomes_softmax():
    s = torch.randn(2, 5, 7) * 10
    _, graph = imported(WrittenOutSoftmaxes(), s)
    graph.eliminate_dead_code(lambda node: True)
    verify(graph)
    assert [node.op for node in graph].count("softmax") == 3 and [node.op for node in graph].count("div") == 2
    for ours, eager in zip(to_fx(graph)(s), WrittenOutSoftmaxes()(s)):
        torch.testing.assert_close(ours, eager)


def test_pattern_reports_the_breaking_node():
    class SoftmaxMatmul(nn.Module):
        def forward(self, s, v):
            return torch.sigmoid(s) @ v

    _, graph = imported(SoftmaxMatmul(), torch.randn(3, 3), torch.randn(3, 2))
    matmul = next(node for node in graph if node.op == "matmul")
    pattern = Op("matmul", Skip({"cast"}, Op("softmax", Any("scores"))), Any("value"))
    result = match(pattern, graph, matmul)
    assert isinstance(result, Mismatch)
    assert "expected softmax" in result.reason and result.node.startswith("sigmoid")


def test_pattern_binds_commutative_inputs():
    class AddThenMul(nn.Module):
        def forward(self, x, y):
            return 2.0 * (y + torch.sin(x))

    _, graph = imported(AddThenMul(), torch.randn(3), torch.randn(3))
    mul = next(node for node in graph if node.op == "mul")
    found = match(Op("mul", Op("add", Op("torch", Any("x"), bind="sin"), Any("y"))), graph, mul)
    assert found and found["sin"].attrs["target"] == "sin"

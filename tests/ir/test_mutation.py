"""In-place writes read as new versions (ir.mutation): which calls write, how later reads are
rerouted, the invariant the graph and the verifier keep, and models that write in place compiled
against eager."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from ir import mutation
from ir.from_fx import from_fx
from ir.graph import Node, StaleRead
from ir.verify import VerificationError, verify
from tests.ir.test_canonicalize import capture, imported
from tests.numerics import assert_close_by_rule


class Writes(nn.Module):
    """One of each way to write a tensor in place."""

    def forward(self, x, y, index):
        a = x * 1
        a.copy_(y)
        b = x + 1
        b.add_(y)
        c = x - 1
        c[:, 0] = 2.0
        d = x * 2
        d += y
        e = x * 3
        e.index_put_((index,), y[0])
        f = x * 4
        torch.relu_(f)
        g = x * 5
        F.relu(g, inplace=True)
        h = x * 6
        h[:, :2].zero_()
        out = torch.empty_like(x)
        torch.add(x, y, out=out)
        return a, b, c, d, e, f, g, h, out


def test_every_spelling_of_a_write_is_seen():
    args = (torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 2]))
    gm = capture(Writes(), *args)
    written = {node.name: [arg.name for arg in mutation.writes(node)] for node in gm.graph.nodes}
    calls = {name: targets for name, targets in written.items() if targets}
    assert len(calls) == 9, calls  # copy_, add_, setitem, +=, index_put_, relu_, relu(inplace), zero_, out=
    for ours, eager in zip(compiler.compile(Writes())(*args), Writes()(*args)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


class ZerosCopyCat(nn.Module):
    """Hugging Face's conv-state update: a fresh zeros buffer, copy_ of the state into it, then cat."""

    def forward(self, state, x):
        buf = torch.zeros(state.shape, dtype=state.dtype)
        buf.copy_(state)
        return torch.cat([buf, x], dim=-1) * 2


class ViewWriteCat(nn.Module):
    """The zeros changed through a view of them, and a buffer filled through setitem then read."""

    def forward(self, x):
        pad = torch.zeros(x.shape[0], 3)
        pad[:, 1:].fill_(1.0)
        left = torch.zeros_like(x)
        left[0] = x[1]
        return torch.cat([pad, x], dim=-1), torch.cat([left, x], dim=-1)


@pytest.mark.parametrize("model,shapes", [(ZerosCopyCat, [(2, 3, 4), (2, 3, 5)]), (ViewWriteCat, [(3, 4)])])
def test_writes_into_zeros_are_not_lost(model, shapes):
    args = [torch.randn(*shape) for shape in shapes]
    compiled = compiler.compile(model())
    ours = compiled(*args)
    eager = model()(*args)
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,), eager if isinstance(eager, tuple) else (eager,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, graph = imported(model(), *args)
    assert not any(node.op == "pad" for node in graph), "a written buffer was read as the zeros it was made as"


def test_reads_after_a_write_read_the_new_version():
    gm = capture(ViewWriteCat(), torch.randn(3, 4))
    graph = from_fx(gm)
    versions = [node for node in graph if node.op == "torch" and node.attrs["target"] == "read_after_write"]
    assert len(versions) == 1  # pad, written through a view, read by the cat
    (version,) = versions
    assert graph.node(version.inputs[1]).writes  # the fill_ it comes after
    assigns = [node for node in graph if node.op == "torch" and node.attrs["target"] == "assign"]
    assert len(assigns) == 1 and any(user.op == "cat" for user in graph.users(assigns[0].name))


class SoftmaxInputWritten(nn.Module):
    """A softmax written out whose input is changed in place between the max and the division."""

    def forward(self, x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        x.mul_(2)
        return e / e.sum(-1, keepdim=True), x


def test_a_rewrite_never_reads_across_a_write():
    x = torch.randn(3, 5)
    _, graph = imported(SoftmaxInputWritten(), x.clone())
    assert not any(node.op == "softmax" for node in graph)
    ours = compiler.compile(SoftmaxInputWritten())(x.clone())
    for a, b in zip(ours, SoftmaxInputWritten()(x.clone())):
        torch.testing.assert_close(a, b)


class QueryWrittenMidAttention(nn.Module):
    """Attention whose query is changed in place after the scores are formed: the fused op, which
    reads q at the end, would see the new values."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.5
        q.add_(1.0)
        return torch.softmax(scores, dim=-1) @ v + q.sum()


class KeyWrittenAfterAttention(nn.Module):
    def forward(self, q, k, v):
        out = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        k.zero_()
        return out


def test_attention_is_not_fused_across_a_write_to_its_inputs():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    compiled = compiler.compile(QueryWrittenMidAttention())
    ours = compiled(q.clone(), k, v)
    torch.testing.assert_close(ours, QueryWrittenMidAttention()(q.clone(), k, v), rtol=1e-5, atol=1e-5)
    assert compiled.patterns == [] and "in place" in compiled.report()
    after = compiler.compile(KeyWrittenAfterAttention())
    ours_k, eager_k = k.clone(), k.clone()
    ours = after(q, ours_k, v)
    torch.testing.assert_close(ours, KeyWrittenAfterAttention()(q, eager_k, v), rtol=1e-5, atol=1e-5)
    assert after.patterns == ["attention"] and not ours_k.any()


class StateCopy(nn.Module):
    """A caller's state written in place and read back (a cache update): the write must stay."""

    def forward(self, state, x):
        state.copy_(state * 0.5 + x)
        return state.sum(-1)


def test_writes_to_inputs_are_kept():
    state, x = torch.randn(2, 4), torch.randn(2, 4)
    ours_state, eager_state = state.clone(), state.clone()
    ours = compiler.compile(StateCopy())(ours_state, x)
    torch.testing.assert_close(ours, StateCopy()(eager_state, x), rtol=0, atol=0)
    torch.testing.assert_close(ours_state, eager_state, rtol=0, atol=0)


def test_graph_refuses_and_verifier_catches_a_stale_read():
    gm = capture(SoftmaxInputWritten(), torch.randn(3, 5))
    graph = from_fx(gm)
    (write,) = [node for node in graph if node.writes]
    x = graph.node(write.inputs[0])
    output = graph.output()
    stale = Node(name="stale", op="softmax", inputs=[x.name], attrs={"dim": 1}, type=x.type, value=x.value,
                 order=write.order + 0.5)
    with pytest.raises(StaleRead):
        graph.add(stale)
    graph.nx.add_node("stale", node=stale)
    graph.nx.add_edge(x.name, "stale")
    graph.set_inputs(output.name, output.inputs + ["stale"])
    with pytest.raises(VerificationError, match="across the in-place write"):
        verify(graph)


def tiny_mamba():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(num_hidden_layers=2, hidden_size=32, state_size=8, vocab_size=64,
                                      intermediate_size=64, conv_kernel=4)
    return transformers.MambaForCausalLM(config).eval()


def test_hugging_face_mamba_decodes_as_eager():
    """Prefill, then decode steps that update the conv and SSM states in the cache in place."""
    model = tiny_mamba()

    def decode(forward):
        torch.manual_seed(1)
        ids = torch.randint(0, 64, (2, 3))
        with torch.no_grad():
            out = forward(ids, use_cache=True)
            logits, cache = [out.logits], out.cache_params
            for step in range(2):
                out = forward(torch.randint(0, 64, (2, 1)), cache_params=cache, use_cache=True,
                              cache_position=torch.tensor([3 + step]))
                logits.append(out.logits)
        return logits

    compiled = compiler.compile(model)
    for ours, eager in zip(decode(compiled), decode(model)):
        torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-4)
    assert "decode step" in compiled.report()


class MambaSsmStep(nn.Module):
    """mamba_ssm's Mamba.step without its Triton kernels: the state is written in place with copy_
    and read back for the output (the caller's cache is that tensor)."""

    def forward(self, ssm_state, x, dt, A, B, C, D, z, dt_bias):
        dt = F.softplus(dt + dt_bias.to(dtype=dt.dtype))
        dA = torch.exp(torch.einsum("bd,dn->bdn", dt, A))
        dB = torch.einsum("bd,bn->bdn", dt, B)
        ssm_state.copy_(ssm_state * dA + x[:, :, None] * dB)
        y = torch.einsum("bdn,bn->bd", ssm_state.to(x.dtype), C)
        y = y + D.to(x.dtype) * x
        return y * F.silu(z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_that_reads_its_state_back_fuses(dtype):
    b, d, n = 3, 37, 16
    args = [torch.randn(b, d, n), torch.randn(b, d), torch.randn(b, d) - 1, -torch.rand(d, n) - 0.5,
            torch.randn(b, n), torch.randn(b, n), torch.randn(d), torch.randn(b, d), torch.randn(d)]
    ours_args, baseline_args = [a.to(dtype) for a in args], [a.to(dtype) for a in args]
    reference_args = [a.double() for a in args]
    compiled = compiler.compile(MambaSsmStep())
    with torch.no_grad():
        ours = compiled(*ours_args)
        baseline = MambaSsmStep()(*baseline_args)
        reference = MambaSsmStep()(*reference_args)
    assert compiled.patterns == ["ssm_scan"] and "decode step" in compiled.report(), compiled.report()
    assert_close_by_rule(ours, baseline, reference)
    assert_close_by_rule(ours_args[0], baseline_args[0], reference_args[0])  # the state, written in place


class RewrittenThenWritten(nn.Module):
    """Found by the fuzzer: baddbmm (rewritten to matmul, mul and add, a new tensor) written by add_
    after a copy_ took its value; the copy's reader must see the value before the write."""

    def forward(self, x0):
        v3 = torch.baddbmm(x0, x0[:, :, :3], x0, beta=0.5, alpha=2.0)
        v6 = torch.zeros(2, 3, 4)
        v6.copy_(v3)
        v3.add_(x0)
        return v3, v6


def test_a_written_result_is_not_rewritten():
    x = torch.randn(2, 3, 4)
    for ours, eager in zip(compiler.compile(RewrittenThenWritten())(x), RewrittenThenWritten()(x)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


class FilledThenWritten(nn.Module):
    """Found by the fuzzer: a buffer filled slice by slice (read as a stack, a new tensor), copied,
    then written again with add_; the copy must keep the values from before the add_."""

    def forward(self, x0):
        v5 = torch.empty(2, 3, 4)
        for i in range(4):
            v5[:, :, i] = x0[:, :, i] + 1.0
        v6 = torch.zeros(2, 3, 4)
        v6.copy_(v5)
        v5.add_(x0)
        return v5, v6


def test_a_filled_buffer_written_again_stays_a_buffer():
    x = torch.randn(2, 3, 4)
    for ours, eager in zip(compiler.compile(FilledThenWritten())(x), FilledThenWritten()(x)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)

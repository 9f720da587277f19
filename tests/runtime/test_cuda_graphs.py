"""compile(model, mode="reduce-overhead"): Inductor's CUDA graphs around sync-free fused ops.

On the CPU: compiled for CUDA graphs, each family's fused op runs its default path without an op
that synchronises with the host on CUDA (item, tolist, bool, equal, nonzero...: checked with a
dispatch mode that raises on them); a mask folded from module state is applied as a tensor, so a
write through `.data` still gives eager's answer; ops that must read values on the host (a scale
from module state, chained masks) call their custom op's cudagraph_unsafe twin, stay exact, and
report() says they run outside CUDA graphs; run-time fallbacks are still reported. On a GPU: a
decode step is captured and replayed (no fused op's Python runs on a replay) and matches eager,
step after step; so are models whose ops keep device tensors across calls (FFT tables, workspaces).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import compiler
from models import dejavu, gpt, hyena
from runtime import library
from runtime.interpret import launch_lock
from tests.compiler.test_attention_pass import CausalThenPadding, padding_masks, qkv
from tests.reliability.test_runtime_edges import CausalBiasBuffer, TemperatureBuffer
from tests.runtime.test_custom_ops import CASES

# aten ops whose CUDA kernels copy a value to the host (and so cannot be captured in a CUDA graph)
HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
              torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
              torch.ops.aten._unique2.default, torch.ops.aten.repeat_interleave.Tensor}

# each family's variants; the sparse MLP's with indices from top-k (given as an input, they are
# range-checked per call: on CUDA by an asynchronous device assert, on the CPU on the host)
SYNC_FREE_CASES = {name: CASES[name] for name in [
    "attention", "attention_causal_gqa", "attention_decode", "attention_bool_mask", "attention_additive_mask",
    "attention_naive_causal", "attention_mask_state", "multihead_attention", "multihead_attention_padding",
    "transformer_encoder_layer", "long_conv_gated", "long_conv_circular", "short_conv", "ssm_scan",
    "ssm_scan_with_state", "ssm_state_update", "ssd_scan_with_state", "ssd_state_update"]}
SYNC_FREE_CASES["sparse_mlp_top_k"] = dejavu.tiny_gathered


class NoHostSync(TorchDispatchMode):
    """Raises on any aten op in HOST_SYNCS run inside the block."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            raise AssertionError(f"{func} synchronises with the host")
        return func(*args, **(kwargs or {}))


def sync_free_calls(module, args):
    """(compiled for CUDA graphs, [(FusedOp, operands)] of one call, that call's outputs)."""
    compiled = compiler.compile(module, strict=True, mode="reduce-overhead")
    with torch.no_grad(), library.recording() as calls:
        out = compiled(*args)
    return compiled, calls, out


def test_no_host_sync_mode_catches_a_sync():
    with pytest.raises(AssertionError, match="synchronises"), NoHostSync():
        torch.equal(torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("build", SYNC_FREE_CASES.values(), ids=SYNC_FREE_CASES.keys())
def test_sync_free_ops_make_no_host_sync(build):
    module, args = build()
    compiled, calls, _ = sync_free_calls(module, args)
    assert calls, compiled.report()
    for op, operands in calls:
        assert op.sync_free and not op.host_synced, op.host_sync_reason
        with torch.no_grad(), launch_lock(), NoHostSync():
            for _ in range(2):  # the first call makes the signature's plan, the second uses it
                op.forward_saving(*operands)
    assert "outside CUDA graphs" not in compiled.report()


def test_folded_mask_is_applied_as_a_tensor_and_follows_data_writes():
    module = CausalBiasBuffer().eval()
    q, k, v = qkv(1, 2, 29, 29, 64)
    compiled, calls, out = sync_free_calls(module, (q, k, v))
    (op, operands), = calls
    torch.testing.assert_close(out, module(q, k, v))
    with torch.no_grad():
        module.state.data.fill_(0.5)  # behind the version counter: a graph replay reads the buffer anew
        with NoHostSync():
            found, _ = op.forward_saving(*operands[:3], module.state)
        torch.testing.assert_close(found, module(q, k, v))
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
    assert not op.fallbacks and op.custom_op is library.custom_op("attention")


@pytest.mark.parametrize("case", ["scale_from_state", "chained_masks"])
def test_ops_reading_values_on_the_host_run_outside_cuda_graphs_and_stay_exact(case):
    if case == "scale_from_state":
        module, args = TemperatureBuffer().eval(), qkv(1, 2, 29, 29, 64)
    else:
        module, args = CausalThenPadding(), (*qkv(2, 2, 17, 17, 16), padding_masks(2, 17, "left")[1])
    compiled, calls, out = sync_free_calls(module, args)
    (op, _), = calls
    torch.testing.assert_close(out, module(*args))
    assert op.host_synced and torch.Tag.cudagraph_unsafe in op.custom_op.tags
    assert f"{op.label} runs outside CUDA graphs: {op.host_sync_reason}" in compiled.report()
    if case == "scale_from_state":
        module.state.data.fill_(0.5)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args), module(*args))


def test_run_time_fallbacks_are_still_reported():
    """A row with no visible key (read on the host, outside the graphs) and sizes past the launch grid's
    limit (decided from metadata, so a captured graph holds the reference) fall back exactly, reported."""
    chained, chained_args = CausalThenPadding(), (*qkv(2, 2, 17, 17, 16), padding_masks(2, 17, "left")[1])
    wide, wide_args = CASES["attention"]()[0], qkv(4100, 16, 1, 3, 8)  # batch * heads > 65535
    for module, args, reason in [(chained, chained_args, "keeps no clearly visible key"),
                                 (wide, wide_args, "exceeds the launch grid's limit")]:
        compiled, calls, out = sync_free_calls(module, args)
        torch.testing.assert_close(out, module(*args), equal_nan=True)
        assert f"{calls[0][0].label} ran in PyTorch 1x" in compiled.report() and reason in compiled.report()
    (op, operands), = calls
    with torch.no_grad(), launch_lock(), NoHostSync():
        op.forward_saving(*operands)  # the reference, as a captured graph would hold it


@pytest.mark.parametrize("options", [dict(mode="reduce-overhead"), dict(options={"cudagraphs": True})],
                         ids=["mode", "options"])
def test_torch_compile_names_the_mode(options):
    from compiler.backend import default_backend

    torch._dynamo.reset()
    module, args = TemperatureBuffer().eval(), qkv(1, 2, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module, backend="flashfx", **options)(*args), module(*args))
    assert default_backend.report.ops[-1].host_synced


def test_cuda_graphs_need_inductor():
    with pytest.raises(ValueError, match="needs inductor"):
        compiler.compile(nn.Identity(), mode="reduce-overhead", inductor=False)


# -- on a GPU: capture and replay ------------------------------------------------------------------
class DecodeStep(nn.Module):
    """One decoding step of a small pre-norm transformer over a static KV cache: the new token's keys
    and values written into the caches (out of place: the step returns them), attention (SDPA with
    a bool mask) over the cache up to `position`, an MLP."""

    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim), norm2=nn.LayerNorm(dim),
            mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)))) for _ in range(layers))

    def forward(self, x, k_cache, v_cache, position):
        """x (1, 1, dim); caches (layers, 1, heads, length, head_dim); position (1,) int64."""
        visible = (torch.arange(k_cache.shape[-2], device=x.device) <= position)[None, :]  # (1, length)
        keys, values = [], []
        for block, k_layer, v_layer in zip(self.blocks, k_cache, v_cache):
            q, k, v = block["qkv"](block["norm1"](x)).view(1, 1, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            keys.append(k_layer.index_copy(2, position, k))
            values.append(v_layer.index_copy(2, position, v))
            attended = F.scaled_dot_product_attention(q, keys[-1], values[-1], attn_mask=visible)
            x = x + block["proj"](attended.transpose(1, 2).reshape(1, 1, -1))
            x = x + block["mlp"](block["norm2"](x))
        return x, torch.stack(keys), torch.stack(values)


def decode(step, steps: int, device: str, length: int = 512, dim: int = 128, heads: int = 4, layers: int = 2):
    """The outputs of `steps` decoding steps from position 100 on, each step's caches fed to the next."""
    torch.manual_seed(1)
    caches = [torch.randn(layers, 1, heads, length, dim // heads, device=device) for _ in range(2)]
    outputs = []
    for position in range(100, 100 + steps):
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(1, 1, dim, device=device)
        out, *caches = step(x, *caches, torch.tensor([position], device=device))
        outputs.append(out.clone())
        caches = [cache.clone() for cache in caches]  # a replay reuses its outputs' memory
    return outputs


def assert_replayed(compiled, run) -> None:
    """`run()` replays Inductor's CUDA graphs: no fused op's Python runs, and no graph was left out of
    them (Inductor counts those since fresh_compile())."""
    with library.recording() as calls:
        run()
    assert not calls and not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], compiled.report()


def fresh_compile(model):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return compiler.compile(model, mode="reduce-overhead")


@pytest.mark.gpu
def test_decode_step_is_captured_and_replayed():
    model = DecodeStep().cuda().eval()
    compiled = fresh_compile(model)
    with torch.no_grad():
        eager = decode(model, 6, "cuda")
        ours = decode(compiled, 6, "cuda")  # warm-up, record, then replays
        for expected, found in zip(eager, ours):
            torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
        assert_replayed(compiled, lambda: decode(compiled, 3, "cuda"))
    assert compiled.patterns == ["attention", "attention"] and compiled._report.inductor_graphs
    assert "outside CUDA graphs" not in compiled.report()


@pytest.mark.gpu
def test_folded_causal_buffer_under_cuda_graphs_follows_data_writes():
    model, (ids,) = gpt.tiny_naive(batch=2, length=64)
    model, ids = model.cuda(), ids.cuda()
    compiled = fresh_compile(model)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            torch.testing.assert_close(compiled(ids).clone(), model(ids), rtol=1e-4, atol=1e-4)
        for block in model.blocks:
            block.attn.bias.data.fill_(1.0)  # no causal mask any more: the graph reads the buffer anew
        torch.compiler.cudagraph_mark_step_begin()
        assert_replayed(compiled, lambda: torch.testing.assert_close(compiled(ids).clone(), model(ids),
                                                                     rtol=1e-4, atol=1e-4))
    assert set(compiled.patterns) == {"attention"}


# models whose fused ops keep device tensors across calls: the long conv's FFT tables, the sparse MLP's workspace
CACHING_MODELS = {"hyena": hyena.tiny, "dejavu": dejavu.tiny_gathered}


@pytest.mark.gpu
@pytest.mark.parametrize("build", CACHING_MODELS.values(), ids=CACHING_MODELS.keys())
def test_tensors_kept_across_calls_stay_out_of_the_graphs_pool(build):
    """Made on the first call, Inductor's warm-up, they come from the ordinary pool
    (codegen.launching.persistent): the check Inductor runs after a warm-up finds nothing of ours
    left alive in the graphs' pool, and the replays match eager."""
    model, args = build()
    model, args = model.cuda().eval(), [arg.cuda() for arg in args]
    compiled = fresh_compile(model)
    with torch.no_grad():
        expected = model(*args)
        for _ in range(3):  # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            torch.testing.assert_close(compiled(*args).clone(), expected, rtol=1e-4, atol=1e-4)
        torch.compiler.cudagraph_mark_step_begin()
        assert_replayed(compiled, lambda: compiled(*args))
    assert compiled.patterns and "outside CUDA graphs" not in compiled.report()

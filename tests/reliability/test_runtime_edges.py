"""The runtime at its edges: module state changed behind the version counter, empty attention,
NaN rows, Dynamo's recompile limit shared across instances, inference mode, FLASHFX_DISABLE."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from models import gpt
from tests.compiler.test_attention_pass import NaiveCausal, Sdpa, WithMask, qkv
from tests.compiler.test_robustness import assert_same_special_values


def compiled_call(module, *args):
    """(compiled module, its output, eager's output) for one call without autograd."""
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        return compiled, compiled(*args), module(*args)


# -- module state folded in at compile time, changed where the version counter cannot see ------
class CausalBiasBuffer(nn.Module):
    """Scores plus a registered causal -inf bias buffer: classified as causal at compile time."""

    def __init__(self, length: int = 29):
        super().__init__()
        self.register_buffer("state", torch.full((length, length), float("-inf")).triu(1))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125 + self.state, dim=-1) @ v


class TemperatureBuffer(nn.Module):
    """Scores scaled by a registered scalar buffer: folded into the kernel's scale at compile time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("state", torch.tensor(0.125))

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) * self.state, dim=-1) @ v


UNTRACKED_WRITES = {
    "data": lambda tensor: tensor.data.fill_(0.5),
    "numpy": lambda tensor: tensor.numpy().fill(0.5),
    "untyped_storage": lambda tensor: tensor.untyped_storage().copy_(torch.full_like(tensor, 0.5).untyped_storage()),
}


@pytest.mark.parametrize("write", UNTRACKED_WRITES.values(), ids=UNTRACKED_WRITES.keys())
@pytest.mark.parametrize("module_type", [CausalBiasBuffer, TemperatureBuffer], ids=["mask", "scale"])
def test_state_written_behind_the_version_counter_is_seen(module_type, write):
    module = module_type()
    q, k, v = qkv(1, 2, 29, 29, 64)
    compiled, ours, eager = compiled_call(module.eval(), q, k, v)
    torch.testing.assert_close(ours, eager)
    version = module.state._version
    write(module.state)
    assert module.state._version == version  # the guard's old check cannot see this write
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
        write(module.state)  # unchanged since the last call: the kernel's folded form may return
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
    assert compiled.patterns == ["attention"]


def test_state_changed_then_restored_folds_again():
    module = CausalBiasBuffer().eval()
    q, k, v = qkv(1, 2, 29, 29, 64)
    compiled, _, _ = compiled_call(module, q, k, v)
    saved = module.state.clone()
    with torch.no_grad():
        module.state.data.zero_()
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
        module.state.data.copy_(saved)
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
    (op,) = compiled._report.ops
    assert not op.fallbacks


# -- attention over no queries or no keys -------------------------------------------------------
EMPTY_CASES = {
    "sdpa": (Sdpa(), ()),
    "sdpa_causal": (Sdpa(is_causal=True), ()),
    "sdpa_gqa": (Sdpa(enable_gqa=True), ()),
    "sdpa_bool_mask": (Sdpa(), ("bool",)),
    "naive_causal": (NaiveCausal(), ()),
    "naive_additive_mask": (WithMask(), ("additive",)),
}


@pytest.mark.parametrize("q_len,kv_len", [(0, 8), (8, 0), (0, 0)])
@pytest.mark.parametrize("case", EMPTY_CASES.values(), ids=EMPTY_CASES.keys())
def test_no_queries_or_no_keys_give_eager_answer(case, q_len, kv_len):
    module, mask_kinds = case
    kv_heads = 1 if getattr(module, "options", {}).get("enable_gqa") else 2
    q, k, v = qkv(1, 2, q_len, kv_len, 16, kv_heads=kv_heads)
    masks = [torch.rand(q_len, kv_len) > 0.5 if kind == "bool" else torch.randn(q_len, kv_len)
             for kind in mask_kinds]
    compiled, ours, eager = compiled_call(module, q, k, v, *masks)
    assert ours.shape == eager.shape
    assert torch.equal(ours, eager)
    assert compiled.patterns == ["attention"]


def test_sdpa_model_on_an_empty_sequence():
    model, _ = gpt.tiny_sdpa_gqa()
    ids = torch.zeros(1, 0, dtype=torch.long)
    compiled = compiler.compile(model)
    with torch.no_grad():
        assert torch.equal(compiled(ids), model(ids))


# -- NaN rows -----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,causal", [
    (2, 2, 1, 300, False),   # decode kernel
    (4, 2, 4, 300, True),    # decode kernel, GQA heads packed
    (2, 2, 16, 16, True),    # prefill, boundary block
    (2, 2, 37, 53, False),   # prefill, partial last block
])
@pytest.mark.parametrize("operand", ["query", "key"])
def test_nan_rows_propagate_as_in_eager_sdpa(heads, kv_heads, q_len, kv_len, causal, operand):
    q, k, v = qkv(1, heads, q_len, kv_len, 16, kv_heads=kv_heads)
    (q if operand == "query" else k)[0, 0, 0, 3] = float("nan")
    module = Sdpa(is_causal=causal, enable_gqa=heads != kv_heads)
    compiled, ours, eager = compiled_call(module, q, k, v)
    assert eager.isnan().any()
    assert compiled.patterns == ["attention"]
    assert_same_special_values(ours, eager)
    assert not compiled._report.ops[0].fallbacks


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_nan_rows_and_fully_masked_rows_together():
    """A fully masked row still gives SDPA's 0 next to a NaN row, which stays NaN."""
    q, k, v = qkv(1, 2, 20, 20, 16)
    q[0, 1, 2] = float("nan")
    keep = torch.ones(20, 20, dtype=torch.bool)
    keep[5] = False
    _, ours, eager = compiled_call(Sdpa(), q, k, v, keep)
    assert (ours[:, :, 5] == 0).all() and ours[0, 1, 2].isnan().all()
    assert_same_special_values(ours, eager)


# -- Dynamo's recompile limit, shared by every instance of a class --------------------------------
class Attend(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_recompile_limit_reached_by_another_instance_is_reported():
    first, second = compiler.compile(Attend()), compiler.compile(Attend())
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for length in (3, 5, 7):
            first(*qkv(1, 1, length, length, 16))
        second(*qkv(1, 1, 3, 3, 16))
    assert second.patterns == []
    report = second.report()
    assert "recompile limit" in report and "Attend.forward" in report
    assert "torch._dynamo.reset()" in report


def test_recompile_limit_reached_by_many_instances_is_reported():
    compiled = [compiler.compile(Attend()) for _ in range(4)]
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for model in compiled:
            model(*qkv(1, 1, 3, 3, 16))
    assert [model.patterns for model in compiled] == [["attention"]] * 2 + [[]] * 2
    for model in compiled[2:]:
        assert "recompile limit" in model.report()


# -- inference mode, FLASHFX_DISABLE ----------------------------------------------------------------
@pytest.mark.parametrize("module_type", [CausalBiasBuffer, TemperatureBuffer, NaiveCausal],
                         ids=["mask_state", "scale_state", "no_state"])
def test_model_built_and_called_in_inference_mode_fuses(module_type):
    with torch.inference_mode():
        module = module_type().eval()
        q, k, v = qkv(1, 2, 29, 29, 64)
        compiled = compiler.compile(module, strict=True)
        ours, eager = compiled(q, k, v), module(q, k, v)
    assert compiled.patterns == ["attention"], compiled.report()
    torch.testing.assert_close(ours, eager)


def test_disabled_report_says_so(monkeypatch):
    monkeypatch.setenv("FLASHFX_DISABLE", "1")
    compiled = compiler.compile(Attend())
    with torch.no_grad():
        compiled(*qkv(1, 1, 3, 3, 16))
    assert "FLASHFX_DISABLE" in compiled.report()

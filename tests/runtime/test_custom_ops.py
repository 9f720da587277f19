"""Every fused op is a torch.library custom op (torch.ops.flashfx.<family>) that passes opcheck,
and trains: its gradients through compile() equal eager's.

Each case compiles a small model of one family variant and records the flashfx op calls its lowered
graph makes, with their operands; opcheck then checks each call's schema, fake kernel (shapes,
dtypes, strides), autograd registration and AOTAutograd tracing.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import compiler
from runtime import library
from runtime.attention import DECODE_MIN_KV_LEN
from runtime.autotune import Autotuner
from runtime.dispatch import FusedOp
from runtime.families import FAMILIES, Family, template_of
from tests.compiler.test_attention_pass import NaiveCausal, Sdpa, WithMask, qkv
from tests.compiler.test_attention_state_scale import StateScaleOverBias
from tests.compiler.test_long_conv_forms import BidirectionalConv, SpelledProduct
from tests.compiler.test_long_conv_pass import Case as ConvCase
from tests.compiler.test_long_conv_pass import TransposedConv
from tests.compiler.test_robustness_families import (long_conv_gated, short_conv_silu, sparse_mlp_gathered,
                                                     sparse_mlp_masked, ssm_scan_grouped)
from tests.compiler.test_sparse_mlp_pass import gated_case
from tests.compiler.test_ssd_scan_pass import minimal_ssd_case, step_case
from tests.compiler.test_ssm_scan_pass import Case as ScanCase
from tests.compiler.test_ssm_scan_pass import ReferenceScan, StateUpdate, scan_inputs
from tests.reliability.test_runtime_edges import CausalBiasBuffer, TemperatureBuffer


def attention_case(module, *masks, kv_heads=None, q_len=7, kv_len=9):
    return lambda: (module, [*qkv(1, 2, q_len, kv_len, 8, kv_heads=kv_heads), *masks])


def decode_case():
    u, delta, A, B, C, D, z, bias = scan_inputs(ScanCase(seqlen=1, dstate=4, dim=3, batch=2))
    return StateUpdate(), [torch.randn(2, 3, 4), u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias]


def multihead_case(**options):
    def build():
        torch.manual_seed(0)
        module = nn.MultiheadAttention(16, 2, batch_first=True).eval()
        x = torch.randn(2, 5, 16)
        call = lambda x, *masks: module(x, x, x, need_weights=False, **dict(zip(options, masks)))[0]  # noqa: E731
        wrapper = type("MultiheadSelfAttention", (nn.Module,), {"forward": lambda self, *a: call(*a)})()
        wrapper.inner = module
        return wrapper, [x, *options.values()]
    return build


def encoder_case():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval(), [torch.randn(2, 5, 16)]


CASES = {
    "attention": attention_case(Sdpa()),
    "attention_causal_gqa": attention_case(Sdpa(is_causal=True, enable_gqa=True), kv_heads=1),
    "attention_decode": attention_case(Sdpa(enable_gqa=True), kv_heads=1, q_len=1, kv_len=DECODE_MIN_KV_LEN),
    "attention_bool_mask": attention_case(Sdpa(), torch.rand(7, 9) > 0.3),
    "attention_additive_mask": attention_case(WithMask(), torch.randn(1, 1, 7, 9)),
    "attention_naive_causal": attention_case(NaiveCausal()),
    "attention_mask_state": lambda: (CausalBiasBuffer(7), list(qkv(1, 2, 7, 7, 8))),
    "attention_scale_state": lambda: (TemperatureBuffer(), list(qkv(1, 2, 7, 9, 8))),
    "attention_state_scale_over_mask": lambda: (StateScaleOverBias(), [*qkv(1, 2, 7, 9, 8), torch.randn(7, 9)]),
    "multihead_attention": multihead_case(),
    "multihead_attention_padding": multihead_case(key_padding_mask=torch.tensor([[False] * 4 + [True]] * 2)),
    "transformer_encoder_layer": encoder_case,
    "long_conv_gated": long_conv_gated,
    "long_conv_transposed": lambda: ConvCase(TransposedConv, 2, 3, 24).build(),
    "long_conv_filters_per_channel": lambda: (SpelledProduct("einsum-chl,bhl", 2, 3, 24), [torch.randn(2, 3, 24)]),
    "long_conv_circular": lambda: (BidirectionalConv(3, 24, gelu=False), [torch.randn(2, 3, 24) * 0.1]),
    "short_conv": short_conv_silu,
    "sparse_mlp_gathered": sparse_mlp_gathered,
    "sparse_mlp_masked": sparse_mlp_masked,
    "sparse_mlp_gated_gathered": lambda: gated_case("idx"),
    "sparse_mlp_gated_masked": lambda: gated_case("bool"),
    "ssm_scan": ssm_scan_grouped,
    "ssm_scan_with_state": lambda: (ReferenceScan(last_state=True), list(scan_inputs(ScanCase(seqlen=5, batch=2)))),
    "ssm_state_update": decode_case,
    "ssd_scan": lambda: minimal_ssd_case(final_state=False),
    "ssd_scan_with_state": minimal_ssd_case,
    "ssd_state_update": step_case,
}
# the encoder layer's fused fast path runs only without autograd; the decode step writes the state it
# read in place, so eager's backward raises (as ours does: the op saved that state)
NO_TRAINING = {"transformer_encoder_layer", "ssm_state_update", "ssd_state_update"}


def recorded_calls(build, training: bool = False):
    """(compiled model, [(custom op, (operands, key))] its lowered graph called); `training`: captured
    with inputs that require grad, so the ops return their backward's residuals."""
    module, args = build()
    compiled = compiler.compile(module, strict=True)
    inputs = [a.clone().requires_grad_(training and a.is_floating_point()) for a in args]
    with torch.set_grad_enabled(training), library.recording() as calls:
        compiled(*inputs)
    assert calls, compiled.report()
    return compiled, [(op.custom_op, (operands, op.key)) for op, operands in calls]


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_opcheck(build):
    compiled, calls = recorded_calls(build)
    for op, (operands, key) in calls:
        operands = [t.detach().requires_grad_(t.is_floating_point()) for t in operands]
        torch.library.opcheck(op, (operands, key))
    assert {op.__name__.split(".")[0] for op, _ in calls} <= set(library.OUTPUTS)


@pytest.mark.parametrize("name", ["attention_causal_gqa", "attention_additive_mask", "multihead_attention_padding",
                                  "ssm_scan", "ssm_scan_with_state", "ssd_scan", "ssd_scan_with_state"])
def test_opcheck_of_ops_captured_for_training(name):
    """Captured with grad, an op returns its backward's residuals (lse, MHA's attention output, chunk
    states), the fake kernel's like the real ones, and its backward kernels pass autograd's and
    AOTAutograd's checks without falling back."""
    compiled, calls = recorded_calls(CASES[name], training=True)
    for op, (operands, key) in calls:
        fused = library.lookup(key)
        assert fused.differentiable
        operands = [t.detach().requires_grad_(t.is_floating_point()) for t in operands]
        assert fused.residuals_like(*operands)
        torch.library.opcheck(op, (operands, key))
        assert not fused.fallbacks, fused.fallbacks


@pytest.mark.parametrize("name", sorted(set(CASES) - NO_TRAINING))
def test_gradients_through_compile_match_eager(name):
    """Kernel forward and backward (or the recomputed reference, in families without backward kernels),
    gradients of inputs and parameters."""
    module, args = CASES[name]()

    def gradients(model):
        inputs = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
        outputs = model(*[a.clone() if a.is_floating_point() else a for a in inputs])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = sum((out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() for out in outputs)
        leaves = [a for a in inputs if a.requires_grad] + [p for p in module.parameters()]
        return outputs, torch.autograd.grad(loss, leaves, allow_unused=True)

    compiled = compiler.compile(module, strict=True)
    ours, our_grads = gradients(compiled)
    eager, eager_grads = gradients(module)
    assert compiled.patterns, compiled.report()
    for out, expected in zip(ours, eager, strict=True):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for grad, expected in zip(our_grads, eager_grads, strict=True):
        if expected is None:
            assert grad is None or not grad.any()
        else:
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)
    for op in compiled._report.ops:  # backward kernels where the family has them, else the reference recomputed
        recomputed = type(op).backward is FusedOp.backward
        assert set(op.fallbacks) == ({op.recompute_reason} if recomputed else set()), compiled.report()


def test_a_freed_op_is_a_clear_error():
    compiled, [(op, (operands, key))] = recorded_calls(CASES["attention"])
    library.OPS.pop(key)
    with pytest.raises(RuntimeError, match="compile the model again"):
        op(operands, key)


TUNED = [name for name in CASES if name not in ("attention_mask_state", "attention_scale_state",
                                                   "multihead_attention_padding", "long_conv_transposed")]


def family_of(op) -> tuple[str, Family]:
    """The family registry's row an op was built from."""
    return next((kind, family) for kind, family in FAMILIES.items() if type(op) is family.op)


def test_every_family_has_a_tuned_case():
    assert {kind for kind in FAMILIES if any(name.startswith(kind) for name in TUNED)} == set(FAMILIES)


@pytest.mark.parametrize("name", TUNED)
def test_max_autotune_tunes_every_family(name, monkeypatch, tmp_path):
    """compile(mode="max-autotune") benchmarks the candidates of every kernel each op launches; a
    training step of a family with backward templates (runtime.families) launches and tunes each."""
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    tuned = []
    monkeypatch.setattr(Autotuner, "tune", lambda self, key, candidates, run: tuned.append(key.kernel) or candidates[0])
    module, args = CASES[name]()
    compiled = compiler.compile(module, mode="max-autotune", strict=True)
    with torch.no_grad():
        compiled(*args)
    (kind, family), = {family_of(op) for op in compiled._report.ops}
    assert name.startswith(kind)
    trains = bool(family.backward) and name not in NO_TRAINING
    if trains:
        outputs = compiled(*[a.detach().requires_grad_() if a.is_floating_point() else a for a in args])
        sum(out.sum() for out in (outputs if isinstance(outputs, tuple) else (outputs,))).backward()
    launched = {kernel.name for kernel in compiled.kernels if kernel.config}
    assert launched and set(tuned) == launched, compiled.report()
    templates = {template_of(kernel) for kernel in launched}
    assert templates <= set(family.forward + family.backward), launched
    assert templates >= set(family.backward if trains else ()), launched


@pytest.mark.parametrize("grad", [True, False])
def test_ops_know_at_compile_time_whether_they_train(grad):
    """An op captured with grad enabled and inputs that require grad returns its backward's residuals;
    one captured for inference does not (TorchDynamo guards on grad mode and requires_grad)."""
    module, args = CASES["attention"]()
    compiled = compiler.compile(module, strict=True)
    inputs = [a.detach().requires_grad_(grad) for a in args]
    with torch.set_grad_enabled(grad):
        compiled(*inputs)
    assert [op.differentiable for op in compiled._report.ops] == [grad]

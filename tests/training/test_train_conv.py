"""Training through the long and short convolutions: gradients of every variant against fp64, the
bytes saved for backward, and 20-step AdamW loops of the tiny H3 and Hyena against eager.

Gradients: each module of tests/compiler/test_long_conv_pass.py's families (norm variants, the complex
fft form, transposed and time-major layouts, gates, D skip, grouped channels, a filter computed per
call from parameters) is compiled in the dtype under test and differentiated with a fixed random
weighting of its output; every input's and parameter's gradient is held to the tolerance rule of
tests/numerics.py against the same module in fp64 (its own fp32 casts kept in fp64, Float64Throughout)
and eager in the dtype under test. The backward kernels must have run: no op fell back.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import codegen.long_conv
import codegen.short_conv
import compiler
from benchmarks.training_memory_conv import measure
from models import h3, hyena
from tests.compiler.equivalence import cast_inputs
from tests.compiler.test_long_conv_pass import (Case, ComplexConv, ConcatPaddedShortConv, FlashConv, GatedConv,
                                                GroupedConv, HyenaConv, ImplicitFilterConv, NormConv, PaddedConv,
                                                PaddedShortConv, PlainConv, ShortConv, TimeMajorConv, TransposedConv,
                                                UnbatchedConv, sequence)
from tests.numerics import assert_close_by_rule, assert_each_close_by_rule
from tests.training.test_training import STEPS, losses

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
CONV_PATTERNS = ("long_conv", "short_conv")
CODEGEN = {"long_conv": codegen.long_conv, "short_conv": codegen.short_conv}


class Float64Throughout(TorchFunctionMode):
    """Eager code in fp64 all the way: its casts of fp64 tensors to fp32 (x.float(), x.to(torch.float32),
    x.to(dtype=torch.float32)) keep fp64, so that an fp64 copy of a model that upcasts is an fp64 reference."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        if func is torch.Tensor.to and args[0].dtype == torch.float64:
            args = tuple(torch.float64 if arg is torch.float32 else arg for arg in args)
            kwargs = {key: torch.float64 if value is torch.float32 else value for key, value in kwargs.items()}
        return func(*args, **kwargs)


LONG_CASES = [
    Case(FlashConv, 2, 3, 1),
    Case(PlainConv, 2, 5, 17, bf16),
    Case(GatedConv, 2, 3, 113, fp16),
    Case(HyenaConv, 1, 7, 100),
    Case(ComplexConv, 1, 3, 113, fp32, (False,)),
    Case(TransposedConv, 2, 5, 17, bf16),
    Case(ImplicitFilterConv, 2, 3, 113),
    Case(PaddedConv, 2, 3, 100, bf16),
    Case(UnbatchedConv, 1, 3, 17, fp16),
    Case(GroupedConv, 2, 3, 33),
    Case(TimeMajorConv, 2, 3, 17, bf16),
    Case(NormConv, 2, 3, 100, fp16, (("ortho", "forward", "backward"), "product")),
    Case(NormConv, 1, 3, 113, fp32, (("backward", "ortho", "forward"), "out")),
    Case(GatedConv, 1, 3, 2100, bf16),  # an FFT of 8192 points: two rows of 4096 (P 2)
]

SHORT_CASES = [  # form, width, activation, batch, channels, seqlen, dtype, transposed
    (ShortConv, 2, "none", 1, 5, 17, fp32, False),
    (ShortConv, 3, "F.silu", 2, 37, 113, bf16, False),
    (ShortConv, 4, "nn.SiLU", 2, 8, 100, fp16, True),
    (PaddedShortConv, 7, "sigmoid", 2, 3, 5, fp32, False),
    (ConcatPaddedShortConv, 4, "F.silu", 1, 3, 1, bf16, False),
    (ShortConv, 4, "F.relu", 2, 5, 33, bf16, False),
    (ShortConv, 3, "nn.GELU", 1, 8, 113, fp32, True),
    (ShortConv, 5, "gelu_tanh", 2, 3, 64, fp16, False),
]


@pytest.mark.parametrize("case", LONG_CASES, ids=str)
def test_long_conv_gradients_match_fp64(case: Case):
    module, args = case.build()
    assert_gradients_by_rule(module, args, case.dtype, "long_conv")


@pytest.mark.parametrize("form, width, activation, batch, channels, seqlen, dtype, transposed", SHORT_CASES,
                         ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_short_conv_gradients_match_fp64(form, width, activation, batch, channels, seqlen, dtype, transposed):
    torch.manual_seed(0)
    module = form(channels, width, activation, transposed)
    x = sequence(batch, seqlen, channels) if transposed else sequence(batch, channels, seqlen)
    assert_gradients_by_rule(module, (x,), dtype, "short_conv")


@pytest.mark.parametrize("pattern", CONV_PATTERNS)
def test_a_call_the_kernels_cannot_take_gets_the_reference_gradients(pattern, monkeypatch):
    """A reason to leave a call to PyTorch (here a made-up one) holds for the backward too: the
    gradients are the reference's, and the report counts the backward's fallback apart."""
    if pattern == "long_conv":
        module, args = Case(GatedConv, 2, 3, 17).build()
    else:
        module, args = ShortConv(5, 4, "F.silu"), (sequence(2, 5, 17),)
    monkeypatch.setattr(CODEGEN[pattern], "unsupported_reason", lambda *args, **kwargs: "a made-up reason")
    compiled = compiler.compile(module, strict=True)
    weights = torch.randn(module(*args).shape)
    for ours, eager in zip(gradients(compiled, args, weights), gradients(module, args, weights), strict=True):
        torch.testing.assert_close(ours, eager)
    (op,) = compiled._report.ops
    assert op.fallbacks == {"a made-up reason": 1, "backward: a made-up reason": 1}


# -- saved for backward ----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["long", "gated"])
def test_long_conv_saves_its_operands_not_the_spectra(op):
    """Ours: u (and the gates), k and D. Eager: also at least one fp32 spectrum of 2L values per row."""
    batch, channels, seqlen = 2, 3, 256
    row = measure(dict(op=op, batch=batch, channels=channels, seqlen=seqlen))
    elements = batch * channels * seqlen
    operands = (1 if op == "long" else 3) * elements * 4 + channels * (seqlen + 1) * 4
    assert row["patterns"] == ["long_conv"]
    assert row["ours_bytes"] <= operands
    assert row["eager_bytes"] >= operands + elements * 2 * 4


def test_short_conv_saves_its_operands_not_the_pre_activation():
    batch, channels, seqlen, width = 2, 5, 100, 4
    row = measure(dict(op="short", batch=batch, channels=channels, seqlen=seqlen))
    elements = batch * channels * seqlen
    assert row["patterns"] == ["short_conv"]
    assert row["ours_bytes"] <= elements * 4 + channels * (width + 1) * 4
    assert row["eager_bytes"] >= 2 * elements * 4


# -- training loops --------------------------------------------------------------------------------
TINY_MODELS = {  # the tiny configs with 4 channels, so that 20 steps run on Triton's interpreter in ~30 s
    "h3": lambda: h3.H3LM(h3.H3Config.tiny(d_model=4, d_state=4)),
    "hyena": lambda: hyena.HyenaLM(hyena.HyenaConfig.tiny(d_model=4)),
}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_adamw_loop_matches_eager_step_by_step(name):
    """20 AdamW steps at L 16: the losses within the rule of eager fp32 against fp64, every step."""
    torch.manual_seed(0)
    model = TINY_MODELS[name]().train()
    ids = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    logits_of = lambda model, ids: model(ids)  # noqa: E731
    with Float64Throughout():
        reference = losses(copy.deepcopy(model).double(), ids, logits_of).float()
    baseline = losses(copy.deepcopy(model), ids, logits_of)
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    ours = losses(compiled, ids, logits_of)
    assert_trained_with_backward_kernels(compiled)
    assert len(ours) == STEPS and ours[-1] < ours[0]
    assert_close_by_rule(ours, baseline, reference)


# -- helpers ---------------------------------------------------------------------------------------
def assert_trained_with_backward_kernels(compiled) -> None:
    """Every convolution op ran its kernels forward and backward: none fell back to PyTorch."""
    ops = [op for op in compiled._report.ops if op.pattern in CONV_PATTERNS]
    assert ops, compiled.report()
    assert all(not op.fallbacks for op in ops), compiled.report()
    names = {kernel.name for kernel in compiled.kernels}
    assert any(name.startswith(tuple(f"{pattern}_backward" for pattern in CONV_PATTERNS)) for name in names)


def gradients(module, args, weights) -> list[torch.Tensor | None]:
    """d sum(module(*args) * weights) / d (each floating arg, then each parameter)."""
    leaves = [a.detach().requires_grad_() for a in args]
    out = module(*leaves)
    loss = (out.to(weights.dtype) * weights).sum()
    return list(torch.autograd.grad(loss, leaves + list(module.parameters()), allow_unused=True))


def assert_gradients_by_rule(module, args, dtype: torch.dtype, pattern: str) -> None:
    """Our gradients in `dtype` against eager's in `dtype` and fp64's, one by one."""
    ours_module = copy.deepcopy(module).to(dtype)
    compiled = compiler.compile(ours_module, strict=True)
    inputs = cast_inputs(args, dtype)
    weights = torch.randn(module(*args).shape, generator=torch.Generator().manual_seed(5))
    ours = gradients(compiled, inputs, weights)
    baseline = gradients(ours_module, inputs, weights)
    with Float64Throughout():
        reference_module = copy.deepcopy(module).double()
        reference = gradients(reference_module, cast_inputs(args, torch.float64), weights.double())
    assert compiled.patterns == [pattern], compiled.report()
    assert_trained_with_backward_kernels(compiled)
    names = [f"input {index}" for index in range(len(args))] + [name for name, _ in module.named_parameters()]
    assert_each_close_by_rule(names, ours, baseline, reference)

"""The depthwise causal conv1d's backward kernel (codegen/short_conv_backward.py, its template).

Each case draws the forward kernel tests' operands (tests/codegen/test_short_conv_kernel.py) and a
random output gradient, poisons dx with NaN, launches the backward kernel and holds dx, dw and db
to the tolerance rule of tests/numerics.py: the reference is short_conv_backward_reference in
fp64, the baseline autograd of plain F.conv1d (+ the activation) in the dtype under test. Every
activation's derivative, filter widths 2..8, odd channel counts, lengths shorter than the filter,
(B, L, H) inputs seen transposed, several tiles along both axes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codegen.activations import REFERENCES
from codegen.short_conv import ShortConvSpec, config_space
from codegen.short_conv_backward import kernel_name, render_short_conv_backward, short_conv_backward_reference
from runtime.loader import load_source
from tests.codegen.test_long_conv_backward_kernel import assert_gradients_by_rule
from tests.codegen.test_short_conv_kernel import DEVICE, Case, _generator, bf16, fp16, fp32, make_operands
from tests.numerics import poisoned_like

CASES = [
    Case(2, 2, 37, 300, fp32),
    Case(2, 1, 3, 1, bf16, bias=True, activation="silu"),
    Case(3, 2, 19, 113, fp16, bias=True),
    Case(3, 1, 111, 100, bf16, bias=True, activation="silu", layout="blh"),
    Case(4, 2, 5, 2, fp32, activation="silu"),
    Case(4, 2, 37, 150, bf16, bias=True, activation="silu"),
    Case(4, 3, 3, 17, fp16, bias=True, activation="gelu", layout="blh"),
    Case(5, 2, 3, 300, fp32, bias=True, activation="gelu_tanh"),
    Case(7, 1, 37, 100, fp16, bias=True, activation="relu", layout="blh"),
    Case(8, 1, 5, 6, bf16, bias=True, activation="gelu_tanh"),
    # several tiles along both axes, a tile wider than the channels
    Case(4, 1, 37, 150, fp32, bias=True, activation="silu", block=(16, 64)),
    Case(3, 1, 3, 300, bf16, activation="gelu", block=(64, 32)),
]

GPU_CASES = [
    Case(4, 8, 3072, 2048, bf16, bias=True, activation="silu", layout="blh"),
    Case(4, 64, 768, 8192, bf16, bias=True, activation="silu"),
    Case(3, 8, 2304, 2048, bf16, bias=True),
    Case(2, 4, 1001, 4097, fp16, activation="gelu"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_kernel_matches_reference(case: Case):
    assert_gradients_by_rule(run_backward_case(case))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_backward_kernel_matches_reference_at_scale(case: Case):
    assert_gradients_by_rule(run_backward_case(case))


@pytest.mark.gpu
def test_every_autotuning_candidate_runs():
    case = Case(4, 2, 333, 1000, bf16, bias=True, activation="silu")
    for config in config_space():
        assert_gradients_by_rule(run_backward_case(case, config=config))


def test_launcher_rejects_arguments_it_was_not_generated_for():
    x, weight, bias = make_operands(Case(4, 1, 3, 10, fp32, bias=True))
    with pytest.raises(ValueError, match="rendered for"):
        load_kernel(ShortConvSpec(4)).launch(x, weight, x, poisoned_like(x), bias=bias)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("activation", [None, *REFERENCES])
def test_every_variant_renders_valid_python(has_bias, activation):
    spec = ShortConvSpec(3, has_bias, activation)
    source = render_short_conv_backward(spec)
    compile(source, "<short_conv_backward>", "exec")
    assert f"def {kernel_name(spec)}(" in source


def test_kernel_name():
    assert kernel_name(ShortConvSpec(4, True, "silu")) == "short_conv_backward_k4_bias_silu"


# -- helpers -------------------------------------------------------------------------------


def load_kernel(spec: ShortConvSpec):
    module, _ = load_source(kernel_name(spec), render_short_conv_backward(spec))
    return module


def run_backward_case(case: Case, config: dict | None = None) -> dict:
    """{gradient name: (kernel's, baseline in case.dtype, fp64 reference)} for one case."""
    x, weight, bias = make_operands(case)
    grad = torch.randn(x.shape, generator=_generator(case, "grad")).to(device=DEVICE, dtype=case.dtype)
    if config is None and case.block is not None:
        config = {"BLOCK_H": case.block[0], "BLOCK_L": case.block[1], "num_warps": 4}
    dx, dw, db = load_kernel(case.spec).launch(x, weight, grad, poisoned_like(x), bias=bias,
                                               activation=case.activation, config=config)
    ours = dict(x=dx, weight=dw.to(case.dtype), bias=None if db is None else db.to(case.dtype))
    baseline = _conv1d_gradients(x, weight, bias, grad, case)
    reference = short_conv_backward_reference(x.double(), weight.double(), grad.double(),
                                              bias=None if bias is None else bias.double(), activation=case.activation)
    return {name: (ours[name], baseline[name], reference[name]) for name in reference}


def _conv1d_gradients(x, weight, bias, grad, case: Case) -> dict[str, torch.Tensor]:
    """Autograd of F.conv1d (+ the activation) in case.dtype, by operand name."""
    leaves = {name: t.detach().requires_grad_() for name, t in dict(x=x, weight=weight, bias=bias).items()
              if t is not None}
    out = F.conv1d(leaves["x"], leaves["weight"][:, None, :], leaves.get("bias"), padding=case.width - 1,
                   groups=case.channels)[..., :case.seqlen]
    if case.activation is not None:
        out = REFERENCES[case.activation](out)
    return dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad)))

"""The depthwise causal conv1d kernel (codegen/short_conv.py, templates/short_conv.py.jinja).

Every case draws fresh random inputs (weights and bias in the dtype under test, as a model in that
dtype holds them), poisons `out` with NaN, launches the generated kernel and holds it to the
tolerance rule of tests/numerics.py: the reference is short_conv_reference in fp64, the baseline
plain F.conv1d (+ the activation) in the dtype under test. Channel counts are odd so that the last
channel tile is partial; lengths shorter than the filter check the zero padding.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from codegen.activations import REFERENCES
from codegen.short_conv import (
    ShortConvSpec,
    config_space,
    default_config,
    kernel_name,
    render_short_conv,
    short_conv_reference,
    unsupported_reason,
)
from runtime.interpret import ensure_mode
from runtime.loader import load_source
from tests.numerics import assert_close_by_rule, poisoned_like

DEVICE = torch.device("cpu" if ensure_mode() else "cuda")
fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Case:
    """One launch. layout "blh": x is a transposed view of a (B, L, H) tensor (Mamba's in_proj
    output); block: (BLOCK_H, BLOCK_L), or None for default_config."""

    width: int
    batch: int
    channels: int
    seqlen: int
    dtype: torch.dtype = fp32
    bias: bool = False
    activation: str | None = None
    layout: str = "bhl"
    block: tuple[int, int] | None = None

    @property
    def spec(self) -> ShortConvSpec:
        return ShortConvSpec(self.width, self.bias, self.activation)

    def __str__(self) -> str:
        parts = [f"k{self.width}", f"b{self.batch}h{self.channels}l{self.seqlen}"]
        parts += [str(self.dtype).removeprefix("torch.")]
        parts += ["bias"] if self.bias else []
        parts += [self.activation] if self.activation else []
        parts += [self.layout] if self.layout != "bhl" else []
        parts += [f"block{self.block[0]}x{self.block[1]}"] if self.block else []
        return "-".join(parts)


CASES = [
    Case(2, 2, 37, 300, fp32),
    Case(2, 1, 3, 1, bf16, bias=True, activation="silu"),
    Case(3, 2, 37, 300, fp16, bias=True),
    Case(3, 1, 111, 1000, bf16, bias=True, layout="blh"),
    Case(3, 2, 5, 2, fp32, activation="silu"),
    Case(4, 2, 37, 1000, bf16, bias=True, activation="silu"),
    Case(4, 1, 111, 300, fp32, bias=True, activation="silu", layout="blh"),
    Case(4, 2, 3, 5, fp16, activation="silu"),
    Case(7, 2, 37, 300, fp16, bias=True, activation="silu", layout="blh"),
    Case(3, 2, 37, 300, bf16, bias=True, activation="relu"),
    Case(4, 1, 37, 113, fp32, activation="gelu"),
    Case(5, 2, 3, 300, fp16, bias=True, activation="gelu_tanh", layout="blh"),
    Case(7, 1, 3, 1000, fp32),
    Case(7, 2, 5, 6, bf16, bias=True),
    Case(8, 1, 37, 300, fp32, bias=True),
    # several tiles along both axes, a tile wider than the channels
    Case(4, 2, 37, 300, fp32, bias=True, activation="silu", block=(16, 64)),
    Case(3, 1, 3, 300, bf16, block=(64, 32)),
]

GPU_CASES = [
    Case(4, 8, 3072, 2048, bf16, bias=True, activation="silu", layout="blh"),
    Case(4, 64, 768, 8192, bf16, bias=True, activation="silu"),
    Case(3, 8, 2304, 2048, bf16, bias=True),
    Case(2, 4, 1001, 4097, fp16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case: Case):
    assert_close_by_rule(*run_case(case))


def test_out_takes_any_float_dtype():
    out, baseline, reference = run_case(Case(4, 2, 37, 300, bf16, bias=True, activation="silu"), out_dtype=fp32)
    assert_close_by_rule(out, baseline.float(), reference)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_kernel_matches_reference_at_scale(case: Case):
    assert_close_by_rule(*run_case(case))


@pytest.mark.gpu
def test_every_autotuning_candidate_runs():
    case = Case(4, 2, 333, 1000, bf16, bias=True, activation="silu")
    for config in config_space():
        assert_close_by_rule(*run_case(case, config=config))


def test_launcher_rejects_arguments_it_was_not_generated_for():
    x, weight, bias = make_operands(Case(4, 1, 3, 10, fp32, bias=True))
    with pytest.raises(ValueError, match="rendered for"):
        load_kernel(ShortConvSpec(4)).launch(x, weight, poisoned_like(x), bias=bias)
    with pytest.raises(ValueError, match="rendered for"):
        load_kernel(ShortConvSpec(4, has_bias=True)).launch(x, weight, poisoned_like(x), bias=bias, activation="silu")


# -- spec, names, configs ------------------------------------------------------------------


def test_spec_validates():
    with pytest.raises(ValueError, match="width"):
        ShortConvSpec(9)
    with pytest.raises(ValueError, match="width"):
        ShortConvSpec(1)
    with pytest.raises(ValueError, match="activation"):
        ShortConvSpec(4, activation="tanh")
    assert ShortConvSpec.for_args(torch.ones(3, 4), torch.ones(3), "silu") == ShortConvSpec(4, True, "silu")


@pytest.mark.parametrize("spec, name", [
    (ShortConvSpec(4), "short_conv_k4"),
    (ShortConvSpec(3, has_bias=True), "short_conv_k3_bias"),
    (ShortConvSpec(2, activation="silu"), "short_conv_k2_silu"),
    (ShortConvSpec(8, True, "silu"), "short_conv_k8_bias_silu"),
])
def test_kernel_name(spec, name):
    assert kernel_name(spec) == name


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_every_variant_renders_valid_python(has_bias, activation):
    source = render_short_conv(ShortConvSpec(4, has_bias, activation))
    compile(source, "<short_conv>", "exec")
    assert "def launch(x, weight, out, *, bias=None, activation=None, config=None):" in source


def test_default_config_follows_the_contiguous_axis():
    time_contiguous = torch.empty(2, 768, 8192)
    channel_contiguous = torch.empty(2, 8192, 768).transpose(1, 2)
    assert default_config(time_contiguous) == {"BLOCK_H": 4, "BLOCK_L": 512, "num_warps": 4}
    assert default_config(channel_contiguous) == {"BLOCK_H": 64, "BLOCK_L": 32, "num_warps": 4}
    assert default_config(torch.empty(1, 3, 5)) == {"BLOCK_H": 4, "BLOCK_L": 8, "num_warps": 4}


def test_config_space():
    space = config_space()
    assert all(1024 <= c["BLOCK_H"] * c["BLOCK_L"] <= 4096 for c in space)
    assert {"BLOCK_H": 4, "BLOCK_L": 512, "num_warps": 4} in space


# -- unsupported_reason --------------------------------------------------------------------


def _operands(x=(2, 3, 10), weight=(3, 4), dtype=fp16, **optional):
    """Keyword arguments of unsupported_reason: random x and weight of these shapes in dtype, then `optional`."""
    return dict(x=torch.randn(x).to(dtype), weight=torch.randn(weight).to(dtype), **optional)


@pytest.mark.parametrize("operands, expected", [
    (_operands(x=(3, 10)), "x must have 3 dimensions"),
    (_operands(weight=(3, 1, 4)), "weight must have 2 dimensions"),
    (_operands(dtype=torch.float64), "x has dtype torch.float64"),
    (_operands(bias=torch.ones(3, device="meta")), "different devices"),
    (_operands(weight=(4, 4)), "weight has shape (4, 4), expected (3, 4)"),
    (_operands(bias=torch.ones(4, dtype=fp16)), "bias has shape"),
    (_operands(out=torch.empty(2, 3, 11, dtype=fp16)), "out has shape"),
    (_operands(activation="tanh"), "activation 'tanh' is not fused"),
    (_operands(weight=(3, 9)), "filter width 9"),
    (_operands(weight=(3, 1)), "filter width 1"),
    (_operands(x=(2, 3, 0)), "empty"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_unsupported_reason(operands, expected):
    assert expected in unsupported_reason(**operands)


def test_supported_operands_have_no_reason():
    operands = _operands(dtype=bf16, bias=torch.ones(3, dtype=bf16), out=torch.empty(2, 3, 10), activation="silu")
    assert unsupported_reason(**operands) is None


# -- helpers -------------------------------------------------------------------------------


def load_kernel(spec: ShortConvSpec):
    module, _ = load_source(kernel_name(spec), render_short_conv(spec))
    return module


def run_case(case: Case, out_dtype: torch.dtype | None = None, config: dict | None = None):
    """(kernel output, baseline F.conv1d in case.dtype, fp64 reference) for one case."""
    x, weight, bias = make_operands(case)
    if config is None and case.block is not None:
        config = {"BLOCK_H": case.block[0], "BLOCK_L": case.block[1], "num_warps": 4}
    out = poisoned_like(torch.empty(x.shape, dtype=out_dtype or case.dtype, device=DEVICE))
    load_kernel(case.spec).launch(x, weight, out, bias=bias, activation=case.activation, config=config)
    baseline = F.conv1d(x, weight[:, None, :], bias, padding=case.width - 1, groups=case.channels)[..., :case.seqlen]
    if case.activation is not None:
        baseline = REFERENCES[case.activation](baseline)
    reference = short_conv_reference(x.double(), weight.double(), bias=None if bias is None else bias.double(),
                                     activation=case.activation)
    return out, baseline, reference


def _generator(case: Case, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case}/{salt}".encode()))


def make_operands(case: Case):
    """x standard normal, as (B, H, L) or a transposed view of (B, L, H); weight (H, K) and bias
    (H,) with nn.Conv1d's init scale 1/sqrt(K); all in case.dtype on DEVICE."""
    if case.layout == "blh":
        x = torch.randn(case.batch, case.seqlen, case.channels, generator=_generator(case, "x")).transpose(1, 2)
    else:
        x = torch.randn(case.batch, case.channels, case.seqlen, generator=_generator(case, "x"))
    g = _generator(case, "weights")
    weight = torch.randn(case.channels, case.width, generator=g) / case.width ** 0.5
    bias = torch.randn(case.channels, generator=g) / case.width ** 0.5 if case.bias else None
    return tuple(None if t is None else t.to(device=DEVICE, dtype=case.dtype) for t in (x, weight, bias))

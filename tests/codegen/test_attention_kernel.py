"""The FlashAttention-2 forward kernel (codegen/attention.py, templates/attention.py.jinja).

Every kernel case draws fresh random inputs, poisons `out` with NaN, launches the generated
kernel and holds it to the tolerance rule of tests/numerics.py: the reference is
attention_reference in fp64, the baseline attention_reference in the dtype under test. Rows
whose every score is -inf must be NaN exactly where the reference's are; the rest is compared.

Without CUDA the kernels run on Triton's interpreter on CPU tensors, so the cases stay small
(batch * heads <= 8); with CUDA the same cases run compiled, and the `gpu` tests add real sizes.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import pytest
import torch

from codegen.attention import (
    AttentionSpec,
    attention_reference,
    config_space,
    default_config,
    kernel_name,
    render_attention,
    unsupported_reason,
)
from runtime.interpret import ensure_mode
from runtime.loader import load_source
from tests.numerics import assert_close_by_rule, poisoned_like

DEVICE = torch.device("cpu" if ensure_mode() else "cuda")
NEG_INF = float("-inf")
FP32_MIN = torch.finfo(torch.float32).min
fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32

# The interpreter runs kernels in numpy, which warns about 0/0 in rows with no visible key,
# about finfo.min * log2(e) before it saturates, and about loop bounds held in 1-element arrays.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


@dataclass(frozen=True)
class Case:
    """One kernel launch. causal_offset "bottom_right" means kv_len - q_len (flash-attn).

    mask_shape: "full" (B, Hq, Lq, Lk), "2d" (Lq, Lk) or "keys" (B, 1, 1, Lk);
    masked_row: query rows 0 and q_len // 2 see no key through the mask; a "keys" mask drops the
    first half of the keys of the last batch element (left padding: leading key blocks all masked);
    layout "blhd": q, k, v are transposed views of (B, L, H, D) tensors;
    block: (BLOCK_M, BLOCK_N), or None for default_config.
    """

    q_len: int
    kv_len: int
    head_dim: int = 64
    dtype: torch.dtype = fp16
    value_dim: int | None = None
    batch: int = 1
    q_heads: int = 2
    kv_heads: int = 2
    causal: bool = False
    causal_offset: int | str = 0
    mask: str = "none"
    mask_keep_when: bool = True
    mask_shape: str = "full"
    fill: float = NEG_INF
    masked_row: bool = False
    layout: str = "bhld"
    block: tuple[int, int] | None = None
    softcap: float | None = None

    @property
    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.head_dim, self.value_dim or self.head_dim, self.mask, self.mask_keep_when, self.causal,
                             softcap=self.softcap is not None)

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len if self.causal_offset == "bottom_right" else self.causal_offset

    def __str__(self) -> str:
        parts = [f"{self.q_len}x{self.kv_len}", f"d{self.head_dim}", str(self.dtype).removeprefix("torch.")]
        parts += [f"dv{self.value_dim}"] if self.value_dim else []
        parts += [f"b{self.batch}h{self.q_heads}kv{self.kv_heads}"]
        parts += [f"causal{self.offset:+d}"] if self.causal else []
        if self.mask != "none":
            polarity = "" if self.mask == "additive" else f"keep{self.mask_keep_when}"
            parts += [f"{self.mask}{polarity}-{self.mask_shape}-fill{'inf' if math.isinf(self.fill) else 'min'}"]
        parts += ["maskedrow"] if self.masked_row else []
        parts += [self.layout] if self.layout != "bhld" else []
        parts += [f"softcap{self.softcap:g}"] if self.softcap is not None else []
        parts += [f"block{self.block[0]}x{self.block[1]}"] if self.block else []
        return "-".join(parts)


CASES = [
    # sequence lengths and head dims
    Case(1, 1, 64, fp32),
    Case(113, 113, 59, fp16, causal=True),
    Case(203, 203, 111, bf16, mask="bool", masked_row=True),
    Case(1023, 1024, 64, fp16, q_heads=1, kv_heads=1, causal=True, causal_offset="bottom_right"),
    Case(113, 203, 96, fp32, value_dim=80, block=(64, 32)),
    Case(64, 96, 256, fp16, q_heads=2, kv_heads=1),
    Case(203, 113, 128, bf16, q_heads=4, kv_heads=2, causal=True),
    Case(2048 + 16, 2048 + 16, 80, bf16, q_heads=1, kv_heads=1, causal=True),
    # causal alignment: Lq > Lk top-left (every late row sees all keys), bottom-right (early rows see none)
    Case(70, 40, 64, fp32, causal=True, block=(16, 16)),
    Case(70, 40, 59, fp32, causal=True, causal_offset="bottom_right", block=(16, 16)),
    Case(40, 100, 64, fp16, causal=True, causal_offset="bottom_right", block=(32, 16)),
    # decode against a cache: BLOCK_M 16, MQA
    Case(1, 203, 128, bf16, q_heads=4, kv_heads=1),
    Case(3, 203, 64, fp16, q_heads=4, kv_heads=1, causal=True, causal_offset="bottom_right"),
    # bool masks: both polarities, fill -inf and finfo.min, broadcast shapes, fully masked rows
    Case(113, 113, 64, fp32, mask="bool", mask_keep_when=False, fill=FP32_MIN, mask_shape="2d", masked_row=True),
    Case(113, 150, 64, fp16, batch=2, mask="bool", mask_keep_when=False, mask_shape="keys", causal=True,
         causal_offset="bottom_right"),
    Case(150, 150, 80, bf16, mask="bool", fill=FP32_MIN, causal=True, masked_row=True, block=(64, 32)),
    Case(113, 203, 64, fp32, mask="bool", mask_keep_when=False, fill=-3.0, mask_shape="2d"),
    # additive masks: -inf and finfo.min entries, broadcast shapes
    Case(113, 113, 64, fp16, mask="additive", masked_row=True),
    Case(113, 113, 64, fp32, mask="additive", fill=FP32_MIN, mask_shape="2d", masked_row=True),
    Case(100, 203, 64, bf16, batch=2, mask="additive", mask_shape="keys", causal=True, causal_offset="bottom_right"),
    # non-contiguous q, k, v: transposed views of (B, L, H, D)
    Case(113, 203, 64, fp16, batch=2, q_heads=4, kv_heads=2, causal=True, layout="blhd"),
    Case(113, 113, 96, fp32, q_heads=2, kv_heads=1, mask="bool", mask_shape="2d", layout="blhd"),
    # logit soft-capping (Gemma 2: 50; a small cap saturates tanh), then masks
    Case(113, 203, 64, fp32, causal=True, causal_offset="bottom_right", softcap=50.0),
    Case(150, 150, 59, fp16, mask="additive", masked_row=True, softcap=0.5),
    Case(113, 113, 128, bf16, q_heads=4, kv_heads=1, mask="bool", fill=FP32_MIN, softcap=2.0),
]

GPU_CASES = [
    Case(8192, 8192, 128, fp16, q_heads=4, kv_heads=4, causal=True),
    Case(8192, 8192, 64, bf16, q_heads=8, kv_heads=2),
    Case(4096, 4096, 128, bf16, batch=2, q_heads=8, kv_heads=1, causal=True),
    Case(2048 + 16, 2048 + 16, 64, fp16, batch=2, q_heads=8, kv_heads=8, mask="bool", mask_shape="keys", causal=True),
    Case(1, 8192, 128, fp16, batch=4, q_heads=32, kv_heads=8),
    Case(8192, 8192, 128, fp16, q_heads=2, kv_heads=2, layout="blhd"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case: Case):
    assert_attention_close(*run_case(case))


@pytest.mark.parametrize("offset", [-17, -1, 1, 14, 15, 30, 47, 100])
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32)])
def test_causal_offsets_across_block_edges(offset, block):
    """Offsets whose diagonal lands on, just before and just after block edges (and past kv_len)."""
    assert_attention_close(*run_case(Case(48, 64, 16, fp32, causal=True, causal_offset=offset, block=block)))


def test_out_takes_any_float_dtype():
    case = Case(113, 113, 64, fp16, causal=True)
    out, baseline, reference = run_case(case, out_dtype=fp32)
    assert_attention_close(out, baseline.float(), reference)


def test_fully_masked_rows_follow_eager_softmax():
    """fill -inf: the row is NaN; a finite fill: uniform weights, the mean of v."""
    nan_case = Case(40, 50, 64, fp32, mask="bool", masked_row=True)
    out, _, _ = run_case(nan_case)
    assert out[:, :, 0].isnan().all() and not out[:, :, 1].isnan().any()
    uniform_case = replace(nan_case, fill=FP32_MIN)
    out, _, _ = run_case(uniform_case)
    _, _, v = make_qkv(uniform_case)
    torch.testing.assert_close(out[:, :, 0], v.mean(dim=2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal_offset", [None, -5])
def test_empty_rows_zero_gives_sdpa_zeros(causal_offset):
    """SDPA's convention: rows with no visible key (masked out, or before the causal diagonal) are 0."""
    case = Case(40, 50, 64, fp32, mask="bool", masked_row=True)
    q, k, v = make_qkv(case)
    mask = make_mask(case)
    causal = causal_offset is not None
    spec = replace(case.spec, causal=causal, empty_rows_zero=True)
    out = poisoned_like(torch.empty(*q.shape[:3], v.shape[-1], device=DEVICE))
    options = dict(scale=0.125, mask=mask, causal_offset=causal_offset or 0)
    load_kernel(spec).launch(q, k, v, out, **options)
    reference = attention_reference(q.double(), k.double(), v.double(), mask_keep_when=case.mask_keep_when,
                                    causal=causal, empty_rows_zero=True, **options)
    assert not out.isnan().any() and (out[:, :, 0] == 0).all()
    assert_close_by_rule(out, attention_reference(q, k, v, mask_keep_when=case.mask_keep_when, causal=causal,
                                                  empty_rows_zero=True, **options), reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_kernel_matches_reference_at_scale(case: Case):
    assert_attention_close(*run_case(case))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_autotuning_candidate_runs(head_dim):
    case = Case(1024 + 16, 1024 + 16, head_dim, fp16, q_heads=4, kv_heads=2, causal=True)
    for config in config_space(case.spec):
        assert_attention_close(*run_case(case, config=config))


def test_launcher_rejects_a_mask_or_softcap_it_was_not_generated_for():
    q, k, v = make_qkv(Case(16, 16, 64, fp32))
    out = poisoned_like(q)
    with pytest.raises(ValueError, match="without a mask"):
        load_kernel(AttentionSpec(64, 64)).launch(q, k, v, out, scale=1.0, mask=torch.zeros(16, 16))
    with pytest.raises(ValueError, match="needs a bool mask"):
        load_kernel(AttentionSpec(64, 64, mask="bool")).launch(q, k, v, out, scale=1.0, mask=torch.zeros(16, 16))
    with pytest.raises(ValueError, match="softcap=None does not fit"):
        load_kernel(AttentionSpec(64, 64, softcap=True)).launch(q, k, v, out, scale=1.0)
    with pytest.raises(ValueError, match="softcap=30.0 does not fit"):
        load_kernel(AttentionSpec(64, 64)).launch(q, k, v, out, scale=1.0, softcap=30.0)


# -- spec, names, configs ------------------------------------------------------------------


def test_spec_validates_and_canonicalises():
    with pytest.raises(ValueError, match="head_dim"):
        AttentionSpec(257, 64)
    with pytest.raises(ValueError, match="value_dim"):
        AttentionSpec(64, 0)
    with pytest.raises(ValueError, match="mask"):
        AttentionSpec(64, 64, mask="float")
    assert AttentionSpec(64, 64, mask="additive", mask_keep_when=False) == AttentionSpec(64, 64, mask="additive")


@pytest.mark.parametrize("spec, name", [
    (AttentionSpec(64, 64), "attention_d64"),
    (AttentionSpec(64, 64, mask="bool", causal=True), "attention_d64_causal_boolmask"),
    (AttentionSpec(128, 64, mask="bool", mask_keep_when=False), "attention_d128_dv64_fillmask"),
    (AttentionSpec(59, 59, mask="additive"), "attention_d59_addmask"),
])
def test_kernel_name(spec, name):
    assert kernel_name(spec) == name


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_variant_renders_valid_python(mask, causal):
    for keep_when in (True, False):
        source = render_attention(AttentionSpec(59, 80, mask, keep_when, causal))
        compile(source, "<attention>", "exec")
        assert "def launch(q, k, v, out, *, scale, mask=None" in source


def test_default_config():
    spec = AttentionSpec(128, 128, causal=True)
    assert default_config(spec, 1, 4096)["BLOCK_M"] == 16
    assert default_config(spec, 4096, 4096) == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    assert default_config(spec, 4096, 4096, itemsize=4) == {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 8,
                                                            "num_stages": 2}
    assert default_config(AttentionSpec(111, 111), 4096, 4096)["BLOCK_N"] == 32  # rows not 16-byte aligned
    assert default_config(AttentionSpec(256, 256), 4096, 4096)["BLOCK_M"] == 64
    assert default_config(AttentionSpec(64, 64), 113, 20)["BLOCK_N"] == 32


def test_config_space():
    small, large = config_space(AttentionSpec(64, 64)), config_space(AttentionSpec(256, 256))
    assert len(small) == 2 * 3 * 3 * 2
    assert {(c["BLOCK_M"], c["BLOCK_N"]) for c in small} == {(m, n) for m in (64, 128) for n in (32, 64, 128)}
    assert 0 < len(large) < len(small)


# -- unsupported_reason --------------------------------------------------------------------


def _operands(q=(2, 4, 16, 64), k=(2, 2, 24, 64), v=(2, 2, 24, 32), dtype=fp16, mask=None):
    """Keyword arguments of unsupported_reason: each of q, k, v a shape or a tensor."""
    operands = {name: x if isinstance(x, torch.Tensor) else torch.randn(x).to(dtype)
                for name, x in (("q", q), ("k", k), ("v", v))}
    return dict(operands, mask=mask)


@pytest.mark.parametrize("operands, expected", [
    (_operands(q=(4, 16, 64)), "q has 3 dims"),
    (_operands(dtype=torch.float64), "float64 is not"),
    (_operands(v=torch.randn(2, 2, 24, 32, dtype=bf16)), "dtypes differ"),
    (_operands(mask=torch.ones(16, 24, dtype=torch.bool, device="meta")), "different devices"),
    (_operands(k=(1, 2, 24, 64)), "batch sizes differ"),
    (_operands(v=(2, 2, 25, 32)), "differ in heads or length"),
    (_operands(k=(2, 2, 24, 80)), "head dims differ"),
    (_operands(q=(2, 4, 0, 64)), "empty"),
    (_operands(q=(2, 4, 16, 320), k=(2, 2, 24, 320)), "head dim 320 > 256"),
    (_operands(v=(2, 2, 24, 512)), "head dim 512 > 256"),
    (_operands(k=(2, 3, 24, 64), v=(2, 3, 24, 32)), "not a multiple of 3 kv heads"),
    (_operands(q=(2, 32768, 1, 16), k=(2, 1, 1, 16), v=(2, 1, 1, 16)), "grid's limit of 65535"),
    (_operands(mask=torch.ones(16, 24, dtype=torch.int32)), "neither bool nor floating"),
    (_operands(mask=torch.ones(16, 23, dtype=torch.bool)), "does not broadcast"),
    (_operands(mask=torch.ones(3, 4, 16, 24)), "does not broadcast"),
    (_operands(mask=torch.ones(1, 2, 4, 16, 24)), "does not broadcast"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_unsupported_reason(operands, expected):
    assert expected in unsupported_reason(**operands)


@pytest.mark.parametrize("mask", [
    None,
    torch.ones(24, dtype=torch.bool),
    torch.zeros(2, 1, 1, 24),
    torch.zeros(2, 4, 16, 24, dtype=bf16),
])
def test_supported_operands_have_no_reason(mask):
    assert unsupported_reason(**_operands(mask=mask)) is None


# -- helpers -------------------------------------------------------------------------------


def load_kernel(spec: AttentionSpec):
    module, _ = load_source(kernel_name(spec), render_attention(spec))
    return module


def run_case(case: Case, out_dtype: torch.dtype | None = None, config: dict | None = None):
    """(kernel output, baseline in case.dtype, fp64 reference) for one case."""
    q, k, v = make_qkv(case)
    mask = make_mask(case)
    scale = case.head_dim ** -0.5
    options = dict(scale=scale, mask=mask, fill_value=case.fill, causal_offset=case.offset, softcap=case.softcap)
    if config is None and case.block is not None:
        config = {"BLOCK_M": case.block[0], "BLOCK_N": case.block[1], "num_warps": 4, "num_stages": 2}
    out = poisoned_like(torch.empty(*q.shape[:3], v.shape[-1], dtype=out_dtype or case.dtype, device=DEVICE))
    load_kernel(case.spec).launch(q, k, v, out, config=config, **options)

    reference_options = dict(options, mask_keep_when=case.mask_keep_when, causal=case.causal)
    baseline = attention_reference(q, k, v, **reference_options)
    if mask is not None and mask.is_floating_point():
        reference_options["mask"] = mask.double()
    reference = attention_reference(q.double(), k.double(), v.double(), **reference_options)
    return out, baseline, reference


def assert_attention_close(ours, baseline, reference):
    """NaN exactly where the reference is NaN (rows with no visible key), the rule elsewhere."""
    empty = reference.isnan()
    assert torch.equal(ours.isnan(), empty), f"{int((ours.isnan() != empty).sum())} elements differ in NaN-ness"
    assert torch.equal(baseline.isnan(), empty)
    assert_close_by_rule(ours.masked_fill(empty, 0), baseline.masked_fill(empty, 0), reference.masked_fill(empty, 0))


def _generator(case: Case, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case}/{salt}".encode()))


def make_qkv(case: Case):
    """Random q, k, v on DEVICE, as (B, H, L, D) or as transposed views of (B, L, H, D)."""
    value_dim = case.value_dim or case.head_dim
    shapes = {"q": (case.q_heads, case.q_len, case.head_dim), "k": (case.kv_heads, case.kv_len, case.head_dim),
              "v": (case.kv_heads, case.kv_len, value_dim)}
    tensors = []
    for name, (heads, length, dim) in shapes.items():
        generator = _generator(case, name)
        if case.layout == "blhd":
            tensor = torch.randn(case.batch, length, heads, dim, generator=generator).transpose(1, 2)
        else:
            tensor = torch.randn(case.batch, heads, length, dim, generator=generator)
        tensors.append(tensor.to(device=DEVICE, dtype=case.dtype))
    return tensors


def make_mask(case: Case) -> torch.Tensor | None:
    """A random mask of case.mask_shape: a fifth of the scores dropped (bool) or set to case.fill."""
    if case.mask == "none":
        return None
    shape = {
        "full": (case.batch, case.q_heads, case.q_len, case.kv_len),
        "2d": (case.q_len, case.kv_len),
        "keys": (case.batch, 1, 1, case.kv_len),
    }[case.mask_shape]
    generator = _generator(case, "mask")
    dropped = torch.rand(shape, generator=generator) < 0.2
    if case.masked_row:
        dropped[..., [0, case.q_len // 2], :] = True
    if case.mask_shape == "keys":
        dropped[-1, ..., : case.kv_len // 2] = True
    if case.mask == "bool":
        mask = dropped if not case.mask_keep_when else ~dropped
    else:
        mask = torch.randn(shape, generator=generator).masked_fill(dropped, case.fill)
    return mask.to(DEVICE)

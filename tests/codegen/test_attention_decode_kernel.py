"""The split-KV decode attention kernel (codegen/attention_decode.py, templates/attention_decode.py.jinja).

Every kernel case draws fresh random inputs, poisons `out` with NaN, launches the generated
decode kernel and holds it to the tolerance rule of tests/numerics.py against
attention_reference in fp64 (baseline: attention_reference in the dtype under test); rows with
no visible key must be NaN exactly where the reference's are (or 0 with empty_rows_zero).

The cases cover one query against caches of 1..4096 keys at awkward lengths, MHA and GQA groups
(8:1, 8:2, 4:4) packed into the tile's rows, head dims 64/111/128, speculative-decoding tree
masks for 2..16 queries, causal alignments, fully masked rows, all three dtypes and strided
operands; explicit configs force many splits, empty splits and several row tiles. The last
section compiles models whose attention is a decode step and checks the compiler picked this
kernel. Without CUDA everything runs on Triton's interpreter at small head counts; the `gpu`
tests add the decode configs of shared/anchors/h100.md.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from codegen.attention import attention_reference
from codegen.attention_decode import (
    DecodeSpec,
    config_space,
    default_config,
    kernel_name,
    num_splits,
    render_decode,
    split_keys,
)
from runtime.attention import DECODE_MAX_Q_LEN, DECODE_MIN_KV_LEN, uses_decode_kernel
from runtime.loader import load_source
from tests.codegen.test_attention_kernel import (  # noqa: F401  (pytestmark: the same warning filters)
    DEVICE,
    FP32_MIN,
    NEG_INF,
    _generator,
    assert_attention_close,
    bf16,
    fp16,
    fp32,
    make_qkv,
    pytestmark,
)
from tests.compiler.equivalence import assert_compiles_equivalent
from tests.numerics import assert_close_by_rule, poisoned_like


@dataclass(frozen=True)
class Case:
    """One decode launch. causal_offset "bottom_right" means kv_len - q_len (a query block
    appended to a cache).

    mask_shape: "full" (B, Hq, Lq, Lk), "keys" (B, 1, 1, Lk: the last batch element's first half
    of the keys dropped, left padding) or "tree" (Lq, Lk: every query sees the cache and its
    ancestors in a random token tree, Medusa's mask; additive trees are 0 / fill);
    masked_row ("full" masks): query 0 of the first head and query q_len // 2 of the last see no key;
    layout "blhd": q, k, v are transposed views of (B, L, H, D) tensors;
    config: (BLOCK_M, BLOCK_N, num_splits), or None for default_config.
    """

    q_len: int
    kv_len: int
    head_dim: int = 64
    dtype: torch.dtype = fp16
    value_dim: int | None = None
    batch: int = 1
    q_heads: int = 8
    kv_heads: int = 2
    causal: bool = False
    causal_offset: int | str = 0
    mask: str = "none"
    mask_keep_when: bool = True
    mask_shape: str = "full"
    fill: float = NEG_INF
    masked_row: bool = False
    empty_rows_zero: bool = False
    layout: str = "bhld"
    config: tuple[int, int, int] | None = None
    softcap: float | None = None

    @property
    def spec(self) -> DecodeSpec:
        return DecodeSpec(self.head_dim, self.value_dim or self.head_dim, self.mask, self.mask_keep_when,
                          self.causal, self.empty_rows_zero, softcap=self.softcap is not None)

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
        parts += ["zeroempty"] if self.empty_rows_zero else []
        parts += [self.layout] if self.layout != "bhld" else []
        parts += [f"softcap{self.softcap:g}"] if self.softcap is not None else []
        parts += ["config" + "x".join(map(str, self.config))] if self.config else []
        return "-".join(parts)


CASES = [
    # one query against caches of awkward lengths; MHA and GQA groups packed into the rows
    Case(1, 1, 64, fp32, q_heads=4, kv_heads=4),
    Case(1, 113, 128, fp16, q_heads=8, kv_heads=1),
    Case(1, 1023, 111, bf16, batch=2, q_heads=8, kv_heads=2),
    Case(1, 2048 + 16, 64, fp16, batch=3, q_heads=4, kv_heads=4),
    Case(1, 4096, 128, bf16, q_heads=8, kv_heads=1),
    Case(1, 700, 64, fp32, value_dim=96, batch=2, q_heads=8, kv_heads=2),
    # causal: bottom-right (queries appended to the cache), top-left and negative offsets
    Case(1, 300, 64, fp32, causal=True, causal_offset="bottom_right"),
    Case(5, 203, 64, fp16, q_heads=4, kv_heads=4, causal=True, causal_offset="bottom_right"),
    Case(16, 500, 128, bf16, q_heads=4, kv_heads=1, causal=True, causal_offset="bottom_right"),
    Case(7, 400, 64, fp32, causal=True, causal_offset=-3, config=(16, 32, 5)),
    # speculative-decoding trees: bool (SDPA's polarity and masked_fill's) and additive
    Case(2, 257, 64, fp16, mask="bool", mask_shape="tree"),
    Case(9, 1000, 128, bf16, q_heads=8, kv_heads=1, mask="bool", mask_shape="tree"),
    Case(16, 600, 64, fp32, q_heads=4, kv_heads=4, mask="bool", mask_keep_when=False, mask_shape="tree"),
    Case(13, 777, 111, fp16, mask="additive", mask_shape="tree"),
    # fully masked rows and padding: NaN as eager softmax, uniform for a finite fill, 0 like SDPA
    Case(3, 333, 64, fp32, mask="bool", masked_row=True),
    Case(1, 333, 64, bf16, q_heads=4, kv_heads=1, mask="bool", fill=FP32_MIN, masked_row=True),
    Case(2, 333, 64, fp16, mask="additive", masked_row=True, empty_rows_zero=True),
    Case(1, 1100, 64, fp16, batch=2, mask="bool", mask_keep_when=False, mask_shape="keys", config=(16, 64, 8)),
    Case(4, 500, 64, fp32, batch=2, mask="additive", fill=FP32_MIN, mask_shape="keys",
         causal=True, causal_offset="bottom_right"),
    # logit soft-capping (Gemma 2), alone and under a causal tree of queries with a padding bias
    Case(1, 600, 128, bf16, q_heads=8, kv_heads=4, softcap=50.0),
    Case(4, 500, 64, fp32, batch=2, mask="additive", mask_shape="keys", causal=True, causal_offset="bottom_right",
         softcap=1.5),
    # strided operands; more splits than blocks; several row tiles (group * q_len > BLOCK_M)
    Case(3, 513, 64, fp16, batch=2, q_heads=4, kv_heads=2, layout="blhd"),
    Case(1, 200, 64, fp32, q_heads=2, kv_heads=2, config=(16, 16, 64)),
    Case(5, 300, 64, fp16, q_heads=8, kv_heads=2, causal=True, causal_offset="bottom_right", config=(16, 32, 3)),
    Case(16, 320, 64, bf16, q_heads=8, kv_heads=1, mask="bool", mask_shape="tree", config=(64, 32, 2)),
]

GPU_CASES = [
    # shared/anchors/h100.md's decode configs
    Case(1, 8192, 128, bf16, q_heads=32, kv_heads=4),
    Case(1, 8192, 128, bf16, q_heads=32, kv_heads=32),
    Case(1, 32768, 128, bf16, q_heads=32, kv_heads=8),
    Case(1, 8192, 128, bf16, batch=8, q_heads=32, kv_heads=4),
    Case(1, 131072, 128, bf16, q_heads=32, kv_heads=4),
    Case(1, 4096, 128, bf16, batch=64, q_heads=32, kv_heads=8),
    # trees, causal blocks, strided caches at scale
    Case(64, 8192, 128, bf16, q_heads=32, kv_heads=8, mask="bool", mask_shape="tree"),
    Case(16, 4096 + 16, 128, fp16, batch=4, q_heads=32, kv_heads=8, causal=True, causal_offset="bottom_right"),
    Case(4, 16384, 64, fp16, batch=2, q_heads=16, kv_heads=16, mask="additive", mask_shape="keys", layout="blhd"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case: Case):
    assert_decode_close(case, *run_case(case))


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
def test_any_split_count_gives_the_same_softmax(splits):
    """Split boundaries inside and at the edge of the visible keys, and splits with no key at all."""
    case = Case(3, 203, 64, fp32, q_heads=4, kv_heads=2, causal=True, causal_offset=60, config=(16, 16, splits))
    assert_decode_close(case, *run_case(case))


def test_out_takes_any_float_dtype():
    case = Case(2, 300, 64, fp16, causal=True, causal_offset="bottom_right")
    out, baseline, reference = run_case(case, out_dtype=fp32)
    assert_attention_close(out, baseline.float(), reference)


def test_fully_masked_rows_follow_eager_softmax_or_sdpa():
    """fill -inf: NaN; a finite fill: uniform weights (the mean of v); empty_rows_zero: 0."""
    case = Case(2, 300, 64, fp32, q_heads=4, kv_heads=2, mask="bool", masked_row=True)
    out, _, _ = run_case(case)
    assert out[:, 0, 0].isnan().all() and out[:, -1, 1].isnan().all() and not out[:, 1:3].isnan().any()
    uniform_case = replace(case, fill=FP32_MIN)
    out, _, _ = run_case(uniform_case)
    _, _, v = make_qkv(uniform_case)
    torch.testing.assert_close(out[:, 0, 0], v[:, 0].mean(dim=1), atol=1e-5, rtol=1e-5)
    out, _, _ = run_case(replace(case, empty_rows_zero=True))
    assert not out.isnan().any() and (out[:, 0, 0] == 0).all() and (out[:, -1, 1] == 0).all()


def test_launcher_rejects_a_mask_it_was_not_generated_for():
    q, k, v = make_qkv(Case(1, 16, 64, fp32))
    out = poisoned_like(q)
    with pytest.raises(ValueError, match="without a mask"):
        load_kernel(DecodeSpec(64, 64)).launch(q, k, v, out, scale=1.0, mask=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="needs a floating-point"):
        load_kernel(DecodeSpec(64, 64, mask="additive")).launch(q, k, v, out, scale=1.0,
                                                               mask=torch.ones(1, 16, dtype=torch.bool))


# -- spec, names, configs ------------------------------------------------------------------


@pytest.mark.parametrize("spec, name", [
    (DecodeSpec(128, 128), "attention_decode_d128"),
    (DecodeSpec(64, 64, mask="bool", causal=True, empty_rows_zero=True),
     "attention_decode_d64_causal_boolmask_zeroempty"),
    (DecodeSpec(111, 96, mask="additive"), "attention_decode_d111_dv96_addmask"),
])
def test_kernel_name(spec, name):
    assert kernel_name(spec) == name


def test_decode_and_prefill_specs_differ():
    """Same fields, different kernels: the runtime caches loaded modules per spec."""
    from codegen.attention import AttentionSpec

    assert DecodeSpec(64, 64) != AttentionSpec(64, 64)
    assert len({DecodeSpec(64, 64), AttentionSpec(64, 64)}) == 2


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_variant_renders_valid_python(mask, causal):
    for keep_when, empty_rows_zero in ((True, False), (False, True)):
        source = render_decode(DecodeSpec(59, 80, mask, keep_when, causal, empty_rows_zero))
        compile(source, "<attention_decode>", "exec")
        assert "def launch(q, k, v, out, *, scale, mask=None" in source


def test_num_splits_fills_the_gpu_within_limits():
    h100 = dict(sm_count=132, block_m=16, block_n=64)
    assert num_splits(8192, 8, kv_rows=4, **h100) == 64  # B1 32/4: 256 programs of 128 keys
    assert num_splits(131072, 8, kv_rows=4, **h100) == 66  # 264 programs
    assert num_splits(4096, 4, kv_rows=512, **h100) == 1  # B64 32/8 fills the GPU alone
    assert num_splits(100, 1, kv_rows=1, **h100) == 1
    assert num_splits(8192, 256, kv_rows=8, sm_count=132, block_m=64, block_n=64) == 4  # 2048+ keys per split


@pytest.mark.parametrize("kv_len, splits, block_n", [(8192, 64, 64), (1023, 7, 32), (100, 64, 16), (5, 3, 16)])
def test_split_keys_cover_the_cache_in_whole_blocks(kv_len, splits, block_n):
    per_split = split_keys(kv_len, splits, block_n)
    assert per_split % block_n == 0
    assert -(-kv_len // per_split) <= splits and per_split * splits >= kv_len


def test_default_config():
    spec = DecodeSpec(128, 128)
    config = default_config(spec, 1, 8192, group=8, kv_rows=4, sm_count=132)
    assert config == {"BLOCK_M": 16, "BLOCK_N": 64, "num_splits": 64, "num_warps": 4, "num_stages": 3}
    assert default_config(spec, 16, 8192, group=8, kv_rows=1)["BLOCK_M"] == 64
    assert default_config(DecodeSpec(256, 256), 1, 8192)["BLOCK_N"] == 32
    assert default_config(spec, 1, 20)["BLOCK_N"] == 32
    assert default_config(spec, 1, 8192, itemsize=4)["num_stages"] == 2


def test_config_space():
    candidates = config_space(DecodeSpec(128, 128), 1, 8192, group=8, kv_rows=4, sm_count=132)
    assert {c["BLOCK_N"] for c in candidates} == {32, 64, 128}
    assert {c["num_splits"] for c in candidates if c["BLOCK_N"] == 64} == {32, 64, 128}
    assert all(1 <= c["num_splits"] <= 8192 // c["BLOCK_N"] for c in candidates)
    assert len(config_space(DecodeSpec(256, 256), 1, 8192)) < len(candidates)


def test_runtime_picks_the_decode_kernel_for_short_queries_on_long_caches():
    assert uses_decode_kernel(1, DECODE_MIN_KV_LEN) and uses_decode_kernel(DECODE_MAX_Q_LEN, 131072)
    assert not uses_decode_kernel(1, DECODE_MIN_KV_LEN - 1)
    assert not uses_decode_kernel(DECODE_MAX_Q_LEN + 1, 131072)


# -- chosen by the compiler ----------------------------------------------------------------


class SdpaDecode(nn.Module):
    """One decoding step through SDPA: q_len 1 against the whole cache, GQA via enable_gqa."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class NaiveCachedAttention(nn.Module):
    """nanoGPT-style attention over a KV cache: new keys appended, a tril mask aligned bottom-right."""

    def forward(self, q, k_new, v_new, k_cache, v_cache):
        k, v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
        lq, lk = q.shape[-2], k.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~visible, float("-inf"))
        return F.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class TreeVerify(nn.Module):
    """Medusa's tree verification: a few draft tokens, a (q_len, kv_len) tree mask, SDPA."""

    def forward(self, q, k, v, tree):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tree)


def assert_decode_kernel_ran(compiled, name: str) -> None:
    """`name` is the one decode kernel generated, and no fused op fell back to PyTorch."""
    report = compiled.report()
    assert "ran in PyTorch" not in report, report
    assert [kernel.name for kernel in compiled.kernels if "decode" in kernel.name] == [name], report


@pytest.mark.parametrize("dtype", [fp32, bf16], ids=str)
def test_compiler_runs_sdpa_decode_steps_on_the_decode_kernel(dtype):
    q, k, v = qkv(Case(1, 300, 64, q_heads=8, kv_heads=2))
    compiled = assert_compiles_equivalent(SdpaDecode(), (q, k, v), dtype, "attention")
    assert_decode_kernel_ran(compiled, "attention_decode_d64_zeroempty")


def test_compiler_runs_cached_causal_attention_on_the_decode_kernel():
    q, k_new, v_new = qkv(Case(3, 3, 32, q_heads=4, kv_heads=4))
    _, k_cache, v_cache = qkv(Case(1, 290, 32, q_heads=4, kv_heads=4))
    compiled = assert_compiles_equivalent(NaiveCachedAttention(), (q, k_new, v_new, k_cache, v_cache), fp16,
                                          "attention")
    assert "causal (bottom_right)" in compiled.report()
    assert_decode_kernel_ran(compiled, "attention_decode_d32_causal")


def test_compiler_runs_tree_masks_on_the_decode_kernel():
    case = Case(9, 400, 64, q_heads=4, kv_heads=4, mask="bool", mask_shape="tree")
    compiled = assert_compiles_equivalent(TreeVerify(), (*qkv(case), make_mask(case)), fp16, "attention")
    assert_decode_kernel_ran(compiled, "attention_decode_d64_boolmask_zeroempty")


def test_compiler_keeps_prefill_on_flash_attention():
    q, k, v = qkv(Case(DECODE_MAX_Q_LEN + 1, 300, 32, q_heads=2, kv_heads=2))
    compiled = assert_compiles_equivalent(SdpaDecode(), (q, k, v), fp32, "attention")
    assert [kernel.name for kernel in compiled.kernels] == ["attention_d32_zeroempty"]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hf_llama_decode_step_with_a_kv_cache(implementation):
    """A Hugging Face Llama (GQA 4:2) prefills 300 tokens eagerly, then one compiled decode step."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                      max_position_embeddings=512, attn_implementation=implementation)
    model = transformers.LlamaForCausalLM(config).eval().to(DEVICE)
    prompt, step = torch.randint(0, 128, (1, 300), device=DEVICE), torch.randint(0, 128, (1, 1), device=DEVICE)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        compiled = compiler.compile(model, strict=True)
        ours = compiled(step, past_key_values=copy.deepcopy(cache)).logits
        baseline = model(step, past_key_values=copy.deepcopy(cache)).logits
        reference = copy.deepcopy(model).double()(step, past_key_values=_cache_to(cache, torch.float64)).logits
    assert compiled.patterns.count("attention") == 2, compiled.report()
    assert_decode_kernel_ran(compiled, "attention_decode_d16" + ("_zeroempty" if implementation == "sdpa" else ""))
    assert_close_by_rule(ours, baseline, reference)


# -- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_kernel_matches_reference_at_scale(case: Case):
    assert_decode_close(case, *run_case(case))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("q_len, group", [(1, 8), (16, 4)])
def test_every_autotuning_candidate_runs(q_len, group):
    case = Case(q_len, 8192 + 16, 128, bf16, batch=2, q_heads=32, kv_heads=32 // group, mask="bool",
                mask_shape="tree" if q_len > 1 else "keys")
    for config in config_space(case.spec, q_len, case.kv_len, group=group, kv_rows=2 * case.kv_heads, sm_count=132):
        assert_decode_close(case, *run_case(case, config=config))


# -- helpers -------------------------------------------------------------------------------


def load_kernel(spec: DecodeSpec):
    module, _ = load_source(kernel_name(spec), render_decode(spec))
    return module


def run_case(case: Case, out_dtype: torch.dtype | None = None, config: dict | None = None):
    """(kernel output, baseline in case.dtype, fp64 reference) for one case."""
    q, k, v = make_qkv(case)
    mask = make_mask(case)
    options = dict(scale=case.head_dim ** -0.5, mask=mask, fill_value=case.fill, causal_offset=case.offset,
                   softcap=case.softcap)
    if config is None and case.config is not None:
        block_m, block_n, splits = case.config
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_splits": splits, "num_warps": 4, "num_stages": 2}
    out = poisoned_like(torch.empty(*q.shape[:3], v.shape[-1], dtype=out_dtype or case.dtype, device=DEVICE))
    load_kernel(case.spec).launch(q, k, v, out, config=config, **options)

    reference_options = dict(options, mask_keep_when=case.mask_keep_when, causal=case.causal,
                             empty_rows_zero=case.empty_rows_zero)
    baseline = attention_reference(q, k, v, **reference_options)
    if mask is not None and mask.is_floating_point():
        reference_options["mask"] = mask.double()
    reference = attention_reference(q.double(), k.double(), v.double(), **reference_options)
    return out, baseline, reference


def assert_decode_close(case: Case, ours, baseline, reference):
    assert_attention_close(ours, baseline, reference)
    if case.empty_rows_zero:
        assert not ours.isnan().any()


def qkv(case: Case):
    """make_qkv in fp32, for compiled-model tests (which cast to their dtype)."""
    return make_qkv(replace(case, dtype=fp32))


def tree_visibility(q_len: int, kv_len: int, generator: torch.Generator) -> torch.Tensor:
    """(q_len, kv_len) bool: the cache, then a random tree of q_len draft tokens (parents precede
    children); a token sees the whole cache, its ancestors and itself."""
    cached = kv_len - q_len
    visible = torch.zeros(q_len, kv_len, dtype=torch.bool)
    visible[:, :cached] = True
    parents = [-1] + [int(torch.randint(0, node, (), generator=generator)) for node in range(1, q_len)]
    for node in range(q_len):
        ancestor = node
        while ancestor >= 0:
            visible[node, cached + ancestor] = True
            ancestor = parents[ancestor]
    return visible


def make_mask(case: Case) -> torch.Tensor | None:
    """A mask of case.mask_shape: a fifth of the scores dropped at random, or a tree."""
    if case.mask == "none":
        return None
    generator = _generator(case, "mask")
    if case.mask_shape == "tree":
        dropped = ~tree_visibility(case.q_len, case.kv_len, generator)
    else:
        shape = {"full": (case.batch, case.q_heads, case.q_len, case.kv_len),
                 "keys": (case.batch, 1, 1, case.kv_len)}[case.mask_shape]
        dropped = torch.rand(shape, generator=generator) < 0.2
    if case.masked_row:
        dropped[..., 0, 0, :] = True
        dropped[..., -1, case.q_len // 2, :] = True
    if case.mask_shape == "keys":
        dropped[-1, ..., : case.kv_len // 2] = True
    if case.mask == "bool":
        mask = dropped if not case.mask_keep_when else ~dropped
    elif case.mask_shape == "tree":
        mask = torch.zeros(dropped.shape).masked_fill(dropped, case.fill)
    else:
        mask = torch.randn(dropped.shape, generator=generator).masked_fill(dropped, case.fill)
    return mask.to(DEVICE)


def _cache_to(cache, dtype: torch.dtype):
    """A deep copy of a Hugging Face cache with its key and value tensors cast to `dtype`."""
    cache = copy.deepcopy(cache)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    return cache

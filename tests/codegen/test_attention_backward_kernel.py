"""The FlashAttention-2 backward kernels (codegen/attention_backward.py, templates/attention_backward.py.jinja).

Each case runs the forward kernel with its row log-sum-exp, then the dq and dkdv kernels on a
fresh random output gradient, into NaN-poisoned buffers, and holds each gradient to the tolerance
rule of tests/numerics.py: the reference differentiates attention_reference in fp64, the baseline
the same in the case's dtype. Gradients are NaN exactly where the reference's are (eager's NaN
weights of rows with no visible key reach dV); the rest is compared. Dropout is checked
statistically and by rebuilding the forward's keep mask from its output with v = I.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from codegen.attention import LOG2E, AttentionSpec, attention_reference, lse_shape
from codegen.attention_backward import (AttentionBackwardSpec, attention_backward_reference, config_space,
                                        default_config, kernel_name, render_backward)
from runtime.loader import load_source
from tests.codegen.test_attention_kernel import (DEVICE, FP32_MIN, Case, bf16, fp16, fp32, load_kernel, make_mask,
                                                 make_qkv)
from tests.numerics import assert_close_by_rule, poisoned_like

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

CASES = [
    Case(1, 1, 64, fp32),
    Case(17, 17, 59, fp16, causal=True),
    Case(113, 113, 80, bf16, q_heads=4, kv_heads=2, causal=True),
    Case(17, 113, 64, fp32, q_heads=4, kv_heads=1, causal=True, causal_offset="bottom_right"),
    # more queries than keys, bottom-right: the first rows see no key (NaN, dv NaN in their head)
    Case(40, 17, 64, fp16, causal=True, causal_offset="bottom_right", block=(16, 16)),
    Case(113, 40, 59, fp32, mask="bool", mask_keep_when=False, mask_shape="2d", masked_row=True),
    Case(40, 113, 64, bf16, batch=2, q_heads=2, kv_heads=1, mask="bool", mask_shape="keys", causal=True,
         causal_offset="bottom_right"),
    Case(50, 50, 80, fp32, mask="bool", fill=FP32_MIN, masked_row=True, causal=True, block=(16, 32)),
    Case(50, 70, 64, fp16, mask="additive", masked_row=True),
    Case(17, 40, 64, fp32, mask="additive", fill=FP32_MIN, mask_shape="2d", causal=True),
    Case(40, 40, 32, fp32, q_heads=2, kv_heads=1, causal=True, layout="blhd"),
    Case(50, 40, 64, fp32, causal=True, causal_offset="bottom_right", softcap=0.5, mask="additive"),
    Case(40, 50, 59, bf16, mask="bool", fill=FP32_MIN, softcap=2.0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_reference(case: Case):
    assert_gradients_close(*run_backward(case))


@pytest.mark.parametrize("offset", [-9, 5, 20])
@pytest.mark.parametrize("block", [(16, 32), (32, 16)])
def test_causal_offsets_across_block_edges(offset, block):
    """Diagonals before, inside and after the first key block, blocks of both aspect ratios."""
    assert_gradients_close(*run_backward(Case(40, 48, 16, fp32, causal=True, causal_offset=offset, block=block)))


def test_empty_rows_zero_gives_zero_gradients():
    """SDPA's convention: a row with no visible key is 0, and so is every gradient it feeds."""
    ours, baseline, reference = run_backward(Case(40, 50, 64, fp32, mask="bool", masked_row=True), empty_rows_zero=True)
    assert not any(grad.isnan().any() for grad in ours)
    assert (ours[0][:, :, 0] == 0).all()
    assert_gradients_close(ours, baseline, reference)


def test_fully_masked_rows_follow_eager():
    """masked_fill(-inf) rows: eager's weights are NaN, so dV is NaN; the fill's backward zeroes dq's row."""
    (dq, dk, dv), *_ = run_backward(Case(40, 50, 64, fp32, mask="bool", masked_row=True))
    assert dv.isnan().all() and (dq[:, :, 0] == 0).all() and not dk.isnan().any()


def test_mask_gradient():
    """An additive mask that requires grad (a learned bias) gets dS summed over its broadcast dims."""
    case = Case(40, 50, 64, fp32, batch=2, q_heads=2, kv_heads=1, mask="additive", mask_shape="keys", causal=True,
                fill=FP32_MIN)
    q, k, v = make_qkv(case)
    mask = make_mask(case)
    options = dict(scale=case.head_dim ** -0.5, mask=mask, causal_offset=case.offset)
    out, lse = run_forward(case, q, k, v, options)
    dout = torch.randn_like(out)
    dmask = torch.zeros(*q.shape[:3], k.shape[2], device=DEVICE)
    gradients(case, q, k, v, out, dout, lse, options, dmask=dmask)
    expected = mask_gradient(q.double(), k.double(), v.double(), dout.double(), mask.double(), options)
    baseline = mask_gradient(q, k, v, dout, mask, options)
    assert_close_by_rule(dmask.sum_to_size(mask.shape), baseline, expected)


def test_lse_matches_reference():
    case = Case(40, 50, 59, fp16, mask="additive", causal=True, causal_offset="bottom_right")
    q, k, v = make_qkv(case)
    options = dict(scale=0.3, mask=make_mask(case), causal_offset=case.offset)
    _, lse = run_forward(case, q, k, v, options)
    assert_close_by_rule(lse.sum(dim=2), row_lse(q, k, options).float(), row_lse(q.double(), k.double(), options))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_keeps_each_weight_with_probability_one_minus_p(dropout_p):
    """With v = I the output is the dropped-out weights: the kept fraction, and (mean, variance) of
    out / weights, are those of keep / (1 - p) with keep ~ Bernoulli(1 - p), within 5 standard errors."""
    weights, out = dropout_weights(Case(64, 64, 64, fp32, batch=2), dropout_p, seed=7)
    ratio = out / weights
    kept = (out != 0).double()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - dropout_p)) < 5 * math.sqrt(dropout_p * (1 - dropout_p) / n)
    torch.testing.assert_close(ratio[out != 0], torch.full_like(ratio[out != 0], 1 / (1 - dropout_p)))
    variance = dropout_p / (1 - dropout_p)
    assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(variance / n)
    assert abs(ratio.var().item() / variance - 1) < 0.1


def test_dropout_backward_reuses_the_forward_mask():
    """The mask read back from the forward's output (v = I) gives the reference gradients the kernels
    must match: a backward that drew other bits would be far off."""
    case, dropout_p = Case(64, 64, 64, fp32, q_heads=2, kv_heads=1, causal=True), 0.3
    q, k, v = make_qkv(case)
    v = torch.eye(64, device=DEVICE).expand(1, 1, 64, 64)
    seed = torch.tensor([12345], dtype=torch.int64, device=DEVICE)
    options = dict(scale=case.head_dim ** -0.5, causal_offset=0, dropout_p=dropout_p, seed=seed)
    out, lse = run_forward(case, q, k, v, options, dropout=True)
    keep = out != 0
    dout = torch.randn_like(out)
    ours = gradients(case, q, k, v, out, dout, lse, options, dropout=True)
    reference_options = dict(scale=options["scale"], causal=True, dropout_p=dropout_p, dropout_keep=keep)
    reference = attention_backward_reference(q.double(), k.double(), v.double(), dout.double(), **reference_options)
    baseline = attention_backward_reference(q, k, v, dout, **reference_options)
    assert_gradients_close(ours, baseline, reference)


def test_dropout_bits_follow_the_seed():
    _, first = dropout_weights(Case(32, 32, 32, fp32), 0.5, seed=1)
    _, again = dropout_weights(Case(32, 32, 32, fp32), 0.5, seed=1)
    _, other = dropout_weights(Case(32, 32, 32, fp32), 0.5, seed=2)
    assert torch.equal(first, again) and not torch.equal(first != 0, other != 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [Case(2048 + 16, 2048 + 16, 128, bf16, q_heads=4, kv_heads=2, causal=True),
                                  Case(1024, 1024, 64, fp16, batch=2, q_heads=4, mask="bool", mask_shape="keys"),
                                  Case(1023, 1024, 80, fp16, causal=True, causal_offset="bottom_right")], ids=str)
def test_gradients_at_scale(case: Case):
    assert_gradients_close(*run_backward(case))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("part", ["dq", "dkdv"])
def test_every_autotuning_candidate_runs(part):
    case = Case(1024 + 16, 1024 + 16, 128, fp16, q_heads=4, kv_heads=2, causal=True)
    for config in config_space(AttentionBackwardSpec(case.spec, part)):
        assert_gradients_close(*run_backward(case, configs={part: config}))


# -- specs and configs ------------------------------------------------------------------


def test_kernel_names():
    spec = AttentionSpec(64, 64, mask="additive", causal=True, lse=True)
    assert kernel_name(AttentionBackwardSpec(spec, "dq")) == "attention_bwd_dq_d64_causal_addmask"
    assert kernel_name(AttentionBackwardSpec(spec, "dq", mask_grad=True)) == "attention_bwd_dq_d64_causal_addmask_dmask"
    assert kernel_name(AttentionBackwardSpec(AttentionSpec(64, 64, dropout=True), "dkdv")) == \
        "attention_bwd_dkdv_d64_dropout"
    with pytest.raises(ValueError, match="only the dq kernel"):
        AttentionBackwardSpec(AttentionSpec(64, 64), "dq", mask_grad=True)


@pytest.mark.parametrize("part", ["dq", "dkdv"])
def test_every_variant_renders_valid_python(part):
    for mask in ("none", "bool", "additive"):
        for flags in ({}, {"causal": True, "softcap": True, "dropout": True}):
            spec = AttentionBackwardSpec(AttentionSpec(59, 80, mask, **flags), part)
            compile(render_backward(spec), "<attention_backward>", "exec")


def test_configs():
    dq, dkdv = (AttentionBackwardSpec(AttentionSpec(128, 128), part) for part in ("dq", "dkdv"))
    assert default_config(dq, 4096, 4096) == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    assert default_config(dkdv, 4096, 4096)["BLOCK_N"] == 64
    assert default_config(dkdv, 20, 20) == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    assert {c["BLOCK_M"] for c in config_space(dq)} <= {64, 128}
    assert {c["BLOCK_N"] for c in config_space(dkdv)} <= {64, 128}
    assert 0 < len(config_space(AttentionBackwardSpec(AttentionSpec(256, 256), "dkdv"))) < len(config_space(dkdv))


# -- helpers -------------------------------------------------------------------------------


def load_backward(spec: AttentionBackwardSpec):
    module, _ = load_source(kernel_name(spec), render_backward(spec))
    return module


def block_config(case: Case) -> dict | None:
    return None if case.block is None else {"BLOCK_M": case.block[0], "BLOCK_N": case.block[1], "num_warps": 4,
                                             "num_stages": 2}


def run_forward(case: Case, q, k, v, options: dict, dropout: bool = False, empty_rows_zero: bool = False):
    """(out, lse) of the forward kernel."""
    spec = replace(case.spec, lse=True, dropout=dropout, empty_rows_zero=empty_rows_zero)
    out = poisoned_like(torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=DEVICE))
    lse = poisoned_like(torch.empty(lse_shape(q.shape), device=DEVICE))
    forward_options = {key: value for key, value in options.items() if key != "dmask"}
    load_kernel(spec).launch(q, k, v, out, lse=lse, config=block_config(case), **forward_options,
                             fill_value=case.fill, softcap=case.softcap)
    return out, lse


def gradients(case: Case, q, k, v, out, dout, lse, options: dict, dropout: bool = False,
              empty_rows_zero: bool = False, dmask=None, configs: dict | None = None):
    """(dq, dk, dv) of the dq and dkdv kernels, into NaN-poisoned buffers."""
    configs = configs or {}
    spec = replace(case.spec, dropout=dropout, empty_rows_zero=empty_rows_zero)
    dq, dk, dv = (poisoned_like(x) for x in (q, k, v))
    delta = poisoned_like(torch.empty(q.shape[:3], device=DEVICE))
    common = dict(options, fill_value=case.fill, softcap=case.softcap)
    dq_spec = AttentionBackwardSpec(spec, "dq", mask_grad=dmask is not None)
    mask_grad = {"dmask": dmask} if dmask is not None else {}
    load_backward(dq_spec).launch(q, k, v, out, dout, lse, delta, dq, **common,
                                  config=configs.get("dq", block_config(case)), **mask_grad)
    load_backward(AttentionBackwardSpec(spec, "dkdv")).launch(q, k, v, dout, lse, delta, dk, dv, **common,
                                                              config=configs.get("dkdv", block_config(case)))
    return dq, dk, dv


def run_backward(case: Case, empty_rows_zero: bool = False, configs: dict | None = None):
    """((dq, dk, dv) of the kernels, the same in case.dtype from PyTorch, in fp64)."""
    q, k, v = make_qkv(case)
    mask = make_mask(case)
    options = dict(scale=case.head_dim ** -0.5, mask=mask, causal_offset=case.offset)
    out, lse = run_forward(case, q, k, v, options, empty_rows_zero=empty_rows_zero)
    dout = torch.randn_like(out)
    ours = gradients(case, q, k, v, out, dout, lse, options, empty_rows_zero=empty_rows_zero, configs=configs)
    reference_options = dict(options, mask_keep_when=case.mask_keep_when, fill_value=case.fill, causal=case.causal,
                             softcap=case.softcap, empty_rows_zero=empty_rows_zero)
    baseline = attention_backward_reference(q, k, v, dout, **reference_options)
    if mask is not None and mask.is_floating_point():
        reference_options["mask"] = mask.double()
    reference = attention_backward_reference(q.double(), k.double(), v.double(), dout.double(), **reference_options)
    return ours, baseline, reference


def assert_gradients_close(ours, baseline, reference):
    """Per gradient: NaN exactly where the reference is NaN, the rule elsewhere."""
    for name, mine, base, ref in zip(("dq", "dk", "dv"), ours, baseline, reference, strict=True):
        nan = ref.isnan()
        assert torch.equal(mine.isnan(), nan), f"{name}: {int((mine.isnan() != nan).sum())} elements differ in NaN-ness"
        try:
            assert_close_by_rule(mine.masked_fill(nan, 0), base.masked_fill(nan, 0), ref.masked_fill(nan, 0))
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def mask_gradient(q, k, v, dout, mask, options):
    mask = mask.detach().requires_grad_()
    with torch.enable_grad():
        out = attention_reference(q, k, v, scale=options["scale"], mask=mask, causal=True,
                                  causal_offset=options["causal_offset"])
        return torch.autograd.grad(out, mask, dout)[0]


def row_lse(q, k, options):
    """Each row's log-sum-exp of the masked scores, in base 2."""
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * options["scale"]
    scores = scores + options["mask"].to(scores.dtype)
    visible = torch.ones(scores.shape[-2:], dtype=torch.bool).tril(options["causal_offset"])
    return scores.masked_fill(~visible, float("-inf")).logsumexp(-1) * LOG2E


def dropout_weights(case: Case, dropout_p: float, seed: int):
    """(softmax weights, the forward kernel's output with v = I: the weights after dropout)."""
    q, k, _ = make_qkv(case)
    v = torch.eye(case.kv_len, device=DEVICE).expand(case.batch, case.kv_heads, -1, -1)
    options = dict(scale=case.head_dim ** -0.5, causal_offset=0, dropout_p=dropout_p,
                   seed=torch.tensor([seed], dtype=torch.int64, device=DEVICE))
    out, _ = run_forward(case, q, k, v, options, dropout=True)
    weights = attention_reference(q, k, v, scale=options["scale"])
    return weights, out

"""Training through the selective scan's backward kernel (codegen/ssm_scan_backward.py).

Every spelling the ssm_scan pass rolls into a scan trains through the kernel, never the recomputed
PyTorch reference: each input's gradient obeys the tolerance rule of tests/numerics.py against the
same module in float64 (baseline: eager in the dtype under test), with random output gradients
(the final state's too). The scan saves its inputs and one state per 256 steps, not the
(b, d, L, n) states eager's loop keeps. Hugging Face's Mamba and FalconMamba train with one
fused scan per layer, and 20 AdamW steps of the tiny Mamba track eager's losses step by step.

Triton's interpreter runs the backward at about 2 (batch, channel, state, step) elements per ms,
and Dynamo unrolls about 70 steps a second, so sizes are small and L 113 goes through the rolled
route. The AdamW loop (20 steps of fwd+bwd of two layers, 64 channels, 4 states) is the longest
test here, ~30 s on an idle core: its scans are 4 steps long, the kernel tests cover long ones.
"""
from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F

import compiler
from codegen.ssm_scan import CHUNK_LEN
from benchmarks.common import saved_bytes
from benchmarks.ssm_scan import Scan, rolled_scan, saved_memory
from ir.fused import Operand, Result, SSMLayout
from models.mamba import MambaConfig, MambaLM, selective_scan_ref
from runtime.autotune import Autotuner
from runtime.ssm_scan import SelectiveScanOp
from tests.compiler.test_ssm_scan_pass import (Case, HuggingFaceScan, MatmulCatScan, PlainScan, PointwiseAssociativeScan,
                                               PreallocatedOutputScan, ReferenceScan, StackedStatesScan, SumCatScan,
                                               hugging_face_mamba, scan_inputs)
from tests.numerics import assert_close_by_rule
from tests.training.test_training import losses

bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def rolled() -> Scan:
    """Mamba's block call of selective_scan_ref, kept rolled under capture (compiler.register_rolled)."""
    return Scan(rolled_scan())


def plain_inputs(case: Case) -> tuple:
    """(u, Δ, A, B, C) for PlainScan, which has no softplus: Δ positive, at Mamba's scales."""
    u, delta, A, B, C, *_ = scan_inputs(case)
    return u, F.softplus(delta - 4), A, B, C


def gradients(module, args, dtype, seed: int):
    """(outputs, gradients of every tensor input) of module(*args) in `dtype`, for fixed random
    output gradients."""
    inputs = [None if a is None else a.detach().to(dtype).requires_grad_() for a in args]
    outputs = module(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(out.shape, generator=g, dtype=fp64).to(out.dtype) for out in outputs]
    leaves = [a for a in inputs if a is not None]
    return outputs, torch.autograd.grad(outputs, leaves, cotangents)


def assert_trains_like_fp64(module, args, dtype, eager=None, mode="default"):
    """Compile `module` in `dtype`: one ssm_scan op, nothing run in PyTorch, every output and input
    gradient within the rule of eager (`eager`, the same math, where given) against fp64."""
    seed = zlib.crc32(repr((type(module).__name__, [None if a is None else a.shape for a in args])).encode())
    eager = module if eager is None else eager
    compiled = compiler.compile(copy.deepcopy(module).to(dtype), mode=mode, strict=True)
    ours, our_grads = gradients(compiled, args, dtype, seed)
    baseline, baseline_grads = gradients(copy.deepcopy(eager).to(dtype), args, dtype, seed)
    reference, reference_grads = gradients(copy.deepcopy(eager).double(), args, fp64, seed)
    report = compiled.report()
    assert compiled.patterns == ["ssm_scan"], report
    assert "ran in PyTorch" not in report, report
    for mine, theirs, exact in zip((*ours, *our_grads), (*baseline, *baseline_grads), (*reference, *reference_grads),
                                   strict=True):
        assert_close_by_rule(mine, theirs, exact)
    return compiled


SPELLINGS = {  # name: (module, inputs, dtype)
    "reference_L1_n16_odd": (ReferenceScan(), Case(seqlen=1, dstate=16, dim=37, batch=2), fp32),
    "reference_L17_grouped_state": (ReferenceScan(last_state=True), Case(seqlen=17, dstate=4, dim=6, groups=2), fp32),
    "reference_no_D_z_bias": (ReferenceScan(), Case(seqlen=17, dstate=4, dim=5, D=False, z=False, bias=False), fp32),
    "reference_bf16": (ReferenceScan(), Case(seqlen=9, dstate=16, dim=3, groups=1, dtype=bf16), bf16),
    "plain_no_softplus": (PlainScan(), Case(seqlen=9, dstate=4, dim=5, batch=2), fp32),
    "hugging_face_loop": (HuggingFaceScan(), Case(seqlen=9, dstate=4, dim=5, z=False), fp32),
    "hugging_face_associative": (HuggingFaceScan(associative=True), Case(seqlen=9, dstate=16, dim=3), fp32),
    "associative_higher_order_op": (PointwiseAssociativeScan(), Case(seqlen=9, dstate=4, dim=5), fp32),
    "sum_cat_grouped_fp16": (SumCatScan(), Case(seqlen=7, dstate=4, dim=4, groups=2, dtype=fp16), fp16),
    "matmul_cat": (MatmulCatScan(), Case(seqlen=9, dstate=4, dim=5, batch=2, z=False), fp32),
    "preallocated_output": (PreallocatedOutputScan(), Case(seqlen=9, dstate=4, dim=5), fp32),
    "stacked_states": (StackedStatesScan("einsum", 2), Case(seqlen=9, dstate=4, dim=5, z=False), fp32),
    "rolled_L113_odd": (rolled(), Case(seqlen=113, dstate=4, dim=3, groups=1), fp32),
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_every_spelling_trains_through_the_backward_kernel(name):
    module, case, dtype = SPELLINGS[name]
    args = plain_inputs(case) if isinstance(module, PlainScan) else scan_inputs(case)
    # eager autograd through the associative_scan higher-order op, called directly on the CPU, gives A
    # no gradient (torch 2.13): hold it to the loop's gradients, the same function
    eager = ReferenceScan() if isinstance(module, PointwiseAssociativeScan) else None
    assert_trains_like_fp64(module, args, dtype, eager)


def test_gradients_of_operands_the_op_broadcasts():
    """An op whose Δ has no batch dim and whose u is time-major with a unit dim (layouts no spelling
    above produces): the kernel writes Δ's gradient into a float32 buffer summed over the batch,
    and u's through a view of a tensor laid out like u."""
    u, delta, A, B, C, D, z, bias = scan_inputs(Case(seqlen=9, dstate=4, dim=5, batch=2))
    layout = SSMLayout(
        operands=(Operand("u", ("b", "l", None, "d")), Operand("delta", ("d", "l")), Operand("A", ("d", "n")),
                  Operand("B", ("b", "n", "l")), Operand("C", ("b", "n", "l")), Operand("D", ("d",)),
                  Operand("delta_bias", ("d",))),
        sizes=(("b", 2), ("d", 5), ("n", 4), ("l", 9), ("g", 1)),
        out=Result(("b", "d", "l"), (2, 5, 9), fp32), state=None, softplus=True)
    op = SelectiveScanOp(("scan",), layout)
    op.differentiable = True
    inputs = [t.detach().requires_grad_() for t in (u.transpose(1, 2)[:, :, None], delta[0], A, B, C, D, bias)]
    (out, _) = op.custom_op(inputs, op.key)
    leaves = [t.detach().requires_grad_() for t in inputs]
    reference = selective_scan_ref(leaves[0][:, :, 0].transpose(1, 2), leaves[1].expand(2, -1, -1), *leaves[2:6],
                                   delta_bias=leaves[6], delta_softplus=True)
    dout = torch.randn_like(out)
    ours, theirs = torch.autograd.grad(out, inputs, dout), torch.autograd.grad(reference, leaves, dout)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for mine, eager, operand in zip(ours, theirs, inputs, strict=True):
        assert mine.shape == operand.shape and mine.stride() == torch.empty_like(operand).stride()  # as the fake's
        torch.testing.assert_close(mine, eager, rtol=1e-4, atol=1e-5)
    assert not op.fallbacks, op.fallbacks


def test_max_autotune_tunes_the_training_kernels(monkeypatch, tmp_path):
    """Training launches the forward with checkpoints and the backward, each tuned: here each tuning
    picks its first candidate, and the gradients still obey the rule."""
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    tuned = []
    monkeypatch.setattr(Autotuner, "tune", lambda self, key, candidates, run: tuned.append(key.kernel) or candidates[0])
    compiled = assert_trains_like_fp64(ReferenceScan(), scan_inputs(Case(seqlen=9, dstate=4, dim=5)), fp32,
                                       mode="max-autotune")
    assert sorted(tuned) == sorted(kernel.name for kernel in compiled.kernels if kernel.config)
    assert {name.split("_D")[0] for name in tuned} == {"ssm_scan", "ssm_scan_backward"}
    assert any(name.endswith("_chunk_states") for name in tuned)


def test_scan_saves_its_inputs_and_chunk_states_not_the_states():
    case = Case(seqlen=2 * CHUNK_LEN + 8, dstate=4, dim=4, batch=1)
    args = [a.requires_grad_() for a in scan_inputs(case)]
    compiled = compiler.compile(rolled(), strict=True)
    ours = saved_bytes(lambda: compiled(*args))
    eager = saved_bytes(lambda: ReferenceScan()(*args))
    inputs = sum(a.nbytes for a in args)
    chunk_states = case.batch * case.dim * 3 * case.dstate * 4  # fp32, one per 256 steps
    states = case.batch * case.dim * case.seqlen * case.dstate * 4
    assert compiled.patterns == ["ssm_scan"], compiled.report()
    assert ours == inputs + chunk_states
    assert eager >= inputs + states


def test_saved_memory_table_rows_on_the_meta_device():
    """benchmarks.ssm_scan.saved_memory's quick rows: the scan as above; the tiny Mamba's forward saves
    less than half of eager's."""
    scan, model = saved_memory(quick=True)
    batch, dim, dstate, seqlen = (scan["config"][key] for key in ("batch", "dim", "dstate", "seqlen"))
    chunk_states = batch * dim * -(-seqlen // CHUNK_LEN) * dstate * 4
    assert scan["ours_bytes"] == scan["inputs_bytes"] + chunk_states
    assert scan["peers_bytes"]["eager"] >= scan["inputs_bytes"] + batch * dim * seqlen * dstate * 4
    assert 2 * model["ours_bytes"] < model["peers_bytes"]["eager"]
    assert not scan["notes"] and not model["notes"], (scan, model)


@pytest.mark.parametrize("falcon, associative", [(False, False), (False, True), (True, False)],
                         ids=["mamba-loop", "mamba-associative_scan", "falcon_mamba-loop"])
def test_hugging_face_mamba_trains_through_the_kernel(falcon, associative):
    model = hugging_face_mamba(associative, falcon=falcon).train()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))

    def parameter_gradients(model):
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    compiled = compiler.compile(model, strict=True)
    ours, our_grads = parameter_gradients(compiled)
    baseline, baseline_grads = parameter_gradients(model)
    reference, reference_grads = parameter_gradients(copy.deepcopy(model).double())
    report = compiled.report()
    assert compiled.patterns.count("ssm_scan") == 2, report
    assert "ssm_scan op" not in report, report  # no scan ran in PyTorch, forward or backward
    assert_close_by_rule(ours, baseline, reference.float())
    for mine, theirs, exact in zip(our_grads, baseline_grads, reference_grads, strict=True):
        assert_close_by_rule(mine, theirs, exact)


def test_tiny_mamba_adamw_loop_matches_eager_step_by_step():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig.tiny()).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))  # 4 steps a scan: the interpreter's scan is slow
    logits_of = lambda model, ids: model(ids)  # noqa: E731
    reference = losses(copy.deepcopy(model).double(), ids, logits_of).float()
    baseline = losses(copy.deepcopy(model), ids, logits_of)
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    ours = losses(compiled, ids, logits_of)
    report = compiled.report()
    assert compiled.patterns.count("ssm_scan") == model.config.n_layer, report
    assert "ssm_scan op" not in report, report
    assert ours[-1] < ours[0]
    assert_close_by_rule(ours, baseline, reference)

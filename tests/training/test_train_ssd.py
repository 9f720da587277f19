"""Training through the SSD scan's backward kernels (codegen/ssd_scan_backward.py).

Every spelling the ssd_scan pass recognises trains through the kernels, never the recomputed
PyTorch reference: Hugging Face's Mamba2Mixer (torch_forward's chunked form, the gated RMS norm
around it), mamba_ssm's ssd_minimal_discrete in torch and with einops (models.mamba2's mixer, and
alone with its final state) and the plain loop over time. Each input's and parameter's gradient
obeys the tolerance rule of tests/numerics.py against the same module in float64 (its fp32 casts
kept in fp64), the baseline eager in the dtype under test, for a fixed random weighting of the
outputs (the final state's too). The scan saves its operands and one fp32 state per chunk, not
eager's decay matrices; 20 AdamW steps of a tiny Mamba2ForCausalLM track eager's losses step by step.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import codegen.ssd_scan
import codegen.ssd_scan_backward
import compiler
from benchmarks.common import saved_bytes
from benchmarks.ssd_scan import ChunkScan, SIZES, scan_inputs
from codegen.ssd_scan_backward import saved_chunk
from models import mamba2
from tests.compiler.equivalence import cast_inputs
from tests.compiler.test_ssd_scan_pass import Loop, MinimalSSD, hf_mamba2, minimal_ssd_case
from tests.numerics import assert_close_by_rule, assert_each_close_by_rule
from tests.training.test_train_conv import Float64Throughout
from tests.training.test_training import STEPS, losses

transformers = pytest.importorskip("transformers")

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def hf_mixer():
    """Hugging Face's Mamba2Mixer (4 heads of 8, 8 states, 2 groups, chunks of 8) on L 19: 3 chunks."""
    mixer = hf_mamba2(layers=1).backbone.layers[0].mixer
    return mixer, [torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(1))]


def minimal_mixer(scan: str):
    def build():
        torch.manual_seed(0)
        config = mamba2.Mamba2Config.tiny()
        return mamba2.Mamba2Mixer(config, scan), [torch.randn(1, 24, config.d_model)]
    return build


def loop():
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 2, 13, 4, 5, 6
    return Loop(), [torch.randn(b, L, h, p, generator=g), torch.randn(b, L, h, generator=g),
                    -torch.rand(h, generator=g), torch.randn(b, L, 2, n, generator=g),
                    torch.randn(b, L, 2, n, generator=g), torch.randn(h, generator=g), torch.rand(h, generator=g) - 3]


SPELLINGS = {  # name: (module and inputs, dtype)
    "hf_mixer": (hf_mixer, fp32),
    "hf_mixer_bf16": (hf_mixer, bf16),
    "minimal_mixer": (minimal_mixer("chunked"), fp32),
    "minimal_mixer_einops": (minimal_mixer("einops"), fp16),
    "minimal_ssd_final_state": (minimal_ssd_case, fp32),
    "loop": (loop, fp32),
}
if mamba2.einops is None:
    SPELLINGS.pop("minimal_mixer_einops")


@pytest.mark.parametrize("name", SPELLINGS)
def test_spellings_train_through_the_kernels(name):
    build, dtype = SPELLINGS[name]
    assert_gradients_by_rule(*build(), dtype)


@pytest.mark.parametrize("cause", ["made-up reason", "state tile too wide"])
def test_a_call_the_kernels_cannot_take_gets_the_reference_gradients(cause, monkeypatch):
    """A reason to leave a call to PyTorch (a made-up one) holds for the backward too, and a state
    tile too wide for the backward's row kernels (here past a limit lowered below 16 x 16) leaves
    just the backward to it: the gradients are the reference's, each fallback counted with its reason."""
    module, args = minimal_ssd_case()
    if cause == "made-up reason":
        monkeypatch.setattr(codegen.ssd_scan, "unsupported_reason", lambda *args, **kwargs: "a made-up reason")
        expected = {"a made-up reason": 1, "backward: a made-up reason": 1}
    else:
        monkeypatch.setattr(codegen.ssd_scan_backward, "MAX_STATE_TILE", 16 * 16 * 4 - 1)
        expected = {f"backward: {codegen.ssd_scan_backward.backward_unsupported_reason(4, 4)}": 1}
    compiled = compiler.compile(module, strict=True)
    for ours, eager in zip(gradients(compiled, args, 5), gradients(module, args, 5), strict=True):
        torch.testing.assert_close(ours, eager)
    (op,) = compiled._report.ops
    assert op.fallbacks == expected


def test_scan_saves_its_operands_and_chunk_states():
    """Hugging Face's chunked scan at L 300 (two chunks of 256): ours saves the operands and (b, 2, h,
    p, n) fp32 states; eager also its (L, 256) decay matrices per head. Measured on the second call:
    the first also captures, and canonicalisation evaluates example values under autograd."""
    config = dict(model="tiny", batch=1, seqlen=300, chunk=256)
    args = [t.requires_grad_() for t in scan_inputs(config, torch.device("cpu"), bf16)]
    compiled = compiler.compile(ChunkScan(256), strict=True)
    compiled(*args)
    ours = saved_bytes(lambda: compiled(*args))
    eager = saved_bytes(lambda: ChunkScan(256)(*args))
    sizes = SIZES["tiny"]
    states = -(-300 // saved_chunk(300)) * sizes["heads"] * sizes["headdim"] * sizes["dstate"] * 4
    assert compiled.patterns == ["ssd_scan"], compiled.report()
    assert ours == sum(t.nbytes for t in args) + states
    assert eager >= ours + 2 * 256 * 256 * sizes["heads"] * 4


def test_adamw_loop_matches_eager_step_by_step():
    """20 AdamW steps of a tiny Mamba2ForCausalLM (one layer: 4 heads of 8, 8 states, 2 groups) at L 9,
    two of its chunks of 8: the losses within the rule of eager fp32 against fp64, every step. ~10 s:
    Triton's interpreter runs the 10 SSD launches of a step at ~40 ms each."""
    model = hf_mamba2(layers=1).train()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    logits_of = lambda model, ids: model(ids).logits  # noqa: E731
    with Float64Throughout():
        reference = losses(copy.deepcopy(model).double(), ids, logits_of).float()
    baseline = losses(copy.deepcopy(model), ids, logits_of)
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    ours = losses(compiled, ids, logits_of)
    assert compiled.patterns.count("ssd_scan") == 1, compiled.report()
    assert_trained_with_backward_kernels(compiled)
    assert len(ours) == STEPS and ours[-1] < ours[0]
    assert_close_by_rule(ours, baseline, reference)


# -- helpers ---------------------------------------------------------------------------------------
def assert_trained_with_backward_kernels(compiled) -> None:
    """Every op ran its kernels forward and backward (none fell back to PyTorch), the SSD's backward among them."""
    assert "ssd_scan" in compiled.patterns, compiled.report()
    assert all(not op.fallbacks for op in compiled._report.ops), compiled.report()
    assert any(kernel.name.startswith("ssd_scan_backward") for kernel in compiled.kernels), compiled.report()


def gradients(module, args, seed: int) -> list[torch.Tensor | None]:
    """d Σ_outputs sum(output * w) / d (each floating arg, then each parameter), w fixed random weights."""
    leaves = [a.detach().requires_grad_() for a in args]
    outputs = module(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() for out in outputs)
    return list(torch.autograd.grad(loss, leaves + list(module.parameters()), allow_unused=True))


def assert_gradients_by_rule(module, args, dtype: torch.dtype) -> None:
    """Our gradients in `dtype` against eager's in `dtype` and fp64's, one by one."""
    ours_module = copy.deepcopy(module).to(dtype)
    compiled = compiler.compile(ours_module, strict=True)
    inputs = cast_inputs(args, dtype)
    ours = gradients(compiled, inputs, 5)
    baseline = gradients(ours_module, inputs, 5)
    with Float64Throughout():
        reference = gradients(copy.deepcopy(module).double(), cast_inputs(args, torch.float64), 5)
    assert_trained_with_backward_kernels(compiled)
    names = [f"input {index}" for index in range(len(args))] + [name for name, _ in module.named_parameters()]
    assert_each_close_by_rule(names, ours, baseline, reference)

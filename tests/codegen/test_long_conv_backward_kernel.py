"""The FFT long convolution's backward kernel (codegen/long_conv_backward.py, its template).

Each case draws the forward kernel tests' operands (tests/codegen/test_long_conv_kernel.py: u
scaled small, decaying filters, standard normal D and gates) and a random output gradient,
poisons every output with NaN, launches the backward kernel on the filter's spectrum, turns the
summed spectrum into dk and dD (spectrum_grads), and holds each gradient to the tolerance
rule of tests/numerics.py: the reference is long_conv_backward_reference in fp64, the baseline the
same autograd of the torch.fft code in the dtype under test.

Operand sets: "" (none), "D", "pre", "post", "gates" (both), "D+gates". Without CUDA the kernels
run on Triton's interpreter, so the sizes stay small: odd channel counts, L 1, 17, 113, 1000 and
4096, P > 1 reached with short rows (max_cols), batch rows shared between programs or not.
"""
from __future__ import annotations

import pytest
import torch

import codegen.long_conv_backward
from codegen.long_conv import LongConvSpec, fft_plan, filter_spectrum, plan_of
from codegen.long_conv_backward import (
    batch_splits,
    dot_precision,
    kernel_name,
    long_conv_backward_reference,
    program_count,
    render_long_conv_backward,
    spectrum_grad_buffer,
    spectrum_grads,
)
from runtime.loader import load_source
from tests.codegen.test_long_conv_kernel import Case, _channels, _sequence, bf16, fp16, fp32, make_operands
from tests.numerics import assert_close_by_rule, poisoned_like

GRADIENTS = ("u", "k", "D", "pre_gate", "post_gate")


class BackwardCase(Case):
    """A forward kernel Case whose operands may also name one gate alone: "pre" or "post"."""

    @property
    def spec(self) -> LongConvSpec:
        gates = "gates" in self.operands
        return LongConvSpec(has_D="D" in self.operands, has_pre_gate=gates or "pre" in self.operands,
                            has_post_gate=gates or "post" in self.operands)


CASES = [
    # every operand set; L 1, 17, 113 (awkward), 1000; odd channel counts
    BackwardCase(2, 3, 100, fp32),
    BackwardCase(3, 5, 17, fp32, "D"),
    BackwardCase(2, 3, 113, fp16, "pre"),
    BackwardCase(1, 7, 113, bf16, "post"),
    BackwardCase(2, 3, 1, bf16, "D+gates"),
    BackwardCase(3, 5, 1000, fp32, "D+gates"),
    BackwardCase(2, 3, 256, fp16, "gates"),
    BackwardCase(1, 1, 1, fp32, "D"),
    # strided operands ((B, L, H) seen transposed), a short filter, a scale, bf16 with an fp32 filter
    BackwardCase(2, 5, 100, bf16, "D+gates", layout="blh"),
    BackwardCase(2, 3, 1000, fp16, "D", taps=17),
    BackwardCase(2, 3, 256, fp32, "D+post", scale=0.25),
    # P > 1: with short rows (P 8 and 4), and at L 4096 with full rows (P 2)
    BackwardCase(2, 3, 1000, fp32, "D+gates", max_cols=256),
    BackwardCase(3, 2, 113, bf16, "pre+D", max_cols=16 * 16),
    BackwardCase(1, 3, 4096, bf16, "D+post"),
]

GPU_CASES = [
    BackwardCase(8, 768, 2048, bf16, "D+gates"),
    BackwardCase(16, 768, 4096, bf16, "D"),
    BackwardCase(4, 768, 16384, bf16, "D+gates"),
    BackwardCase(8, 768, 4096, fp16, "D+gates", layout="blh"),
    BackwardCase(5, 111, 1000, fp32, "D+gates"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_kernel_matches_reference(case: BackwardCase):
    assert_gradients_by_rule(run_backward_case(case))


def test_one_program_sums_every_batch_row_of_its_channel():
    """splits 1: the program of a channel runs all five batch rows, adding each row's spectrum."""
    case = BackwardCase(5, 3, 100, fp32, "D+gates")
    assert_gradients_by_rule(run_backward_case(case, splits=1))
    assert_gradients_by_rule(run_backward_case(BackwardCase(5, 3, 1000, fp16, "D", max_cols=256), splits=1))


def test_persistent_programs_loop_over_items(monkeypatch):
    """P > 1 with two programs, each reusing its scratch for three (channel, share) items in turn."""
    monkeypatch.setattr(codegen.long_conv_backward, "MIN_PERSISTENT_PROGRAMS", 2)
    monkeypatch.setattr(codegen.long_conv_backward, "SCRATCH_L2_BYTES", 0)
    case = BackwardCase(2, 3, 1000, bf16, "D+gates", max_cols=256)
    assert program_count(fft_plan(case.seqlen, case.max_cols), n_items=6) == 2
    assert_gradients_by_rule(run_backward_case(case, splits=2))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_backward_kernel_matches_reference_at_scale(case: BackwardCase):
    assert_gradients_by_rule(run_backward_case(case))


def test_spectrum_grads_are_the_correlation_and_parseval():
    """dk by autograd through filter_spectrum is scale * Re iDFT(d K)[:Lk]; dD is Re sum d K / N."""
    generator = torch.Generator().manual_seed(0)
    k = torch.randn(3, 50, dtype=torch.float64, generator=generator, requires_grad=True)
    k_f = filter_spectrum(k, 100, scale=0.5, max_cols=256)
    partials = torch.randn((2, *k_f.shape), dtype=torch.float64, generator=generator)
    dk, dD = spectrum_grads(k, k_f, partials)
    total = partials.sum(0)
    n = plan_of(k_f, 100).n
    natural = torch.complex(total[:, 0], total[:, 1]).permute(0, 3, 2, 1).reshape(3, n)
    torch.testing.assert_close(dk, 0.5 * torch.fft.ifft(natural).real[:, :50])
    torch.testing.assert_close(dD, total[:, 0].sum((1, 2, 3)) / n)


def test_launcher_rejects_operands_it_was_not_generated_for():
    case = BackwardCase(2, 3, 100, fp32, "D+gates")
    u, k, D, pre, post = make_operands(case)
    k_f = filter_spectrum(k, 100)
    dk_f = spectrum_grad_buffer(1, k_f)
    with pytest.raises(ValueError, match="rendered for"):
        load_kernel(LongConvSpec()).launch(u, k_f, u, poisoned_like(u), dk_f, D=D)
    with pytest.raises(ValueError, match="dpre with pre_gate"):
        load_kernel(LongConvSpec(has_pre_gate=True)).launch(u, k_f, u, poisoned_like(u), dk_f, pre_gate=pre)


@pytest.mark.parametrize("has_D", [False, True])
@pytest.mark.parametrize("gates", [(False, False), (True, False), (False, True), (True, True)])
def test_every_variant_renders_valid_python(has_D, gates):
    spec = LongConvSpec(has_D, *gates)
    source = render_long_conv_backward(spec)
    compile(source, "<long_conv_backward>", "exec")
    assert f"def {kernel_name(spec)}(" in source


def test_kernel_name():
    assert kernel_name(LongConvSpec()) == "long_conv_backward"
    assert kernel_name(LongConvSpec(True, True, True)) == "long_conv_backward_D_pre_gate_post_gate"


def test_batch_splits_fill_the_gpu_only_when_channels_are_few():
    assert batch_splits(batch=64, channels=768) == 1
    assert batch_splits(batch=64, channels=3) == 64
    assert batch_splits(batch=8, channels=100) == 3


def test_dot_precision_keeps_fp32_bits_for_an_fp32_filter():
    assert dot_precision(bf16, fp32) == "tf32x3"
    assert dot_precision(bf16, bf16) == "tf32"
    assert dot_precision(fp16, fp16) == "tf32x3"
    assert dot_precision(fp32, torch.float64) == "ieee"


# -- helpers ---------------------------------------------------------------------------------


def load_kernel(spec: LongConvSpec):
    module, _ = load_source(kernel_name(spec), render_long_conv_backward(spec))
    return module


def run_backward_case(case: BackwardCase, splits: int | None = None, config: dict | None = None):
    """({gradient name: (kernel's, baseline in case.dtype, fp64 reference)}) for one case."""
    u, k, D, pre_gate, post_gate = make_operands(case)
    grad = _sequence(case, "grad")
    k_f = filter_spectrum(k.requires_grad_(), case.seqlen, scale=case.scale, max_cols=case.max_cols)
    dk_f = poisoned_like(spectrum_grad_buffer(splits or batch_splits(case.batch, case.channels), k_f))
    du, dpre, dpost = (None if t is None else poisoned_like(t) for t in (u, pre_gate, post_gate))
    load_kernel(case.spec).launch(u, k_f.detach(), grad, du, dk_f, D=D, pre_gate=pre_gate, post_gate=post_gate,
                                  dpre=dpre, dpost=dpost, dot_precision=dot_precision(u.dtype, k.dtype), config=config)
    dk, dD = spectrum_grads(k, k_f, dk_f)
    k = k.detach()
    ours = dict(u=du, k=dk.to(k.dtype), D=None if D is None else dD.to(D.dtype), pre_gate=dpre, post_gate=dpost)
    operands = dict(D=D, pre_gate=pre_gate, post_gate=post_gate)
    baseline = long_conv_backward_reference(u, k, grad, scale=case.scale, **operands)
    reference = _chunked_reference(u, k, grad, case.scale, **operands)
    return {name: (ours[name], baseline[name], reference[name]) for name in GRADIENTS if name in baseline}


def assert_gradients_by_rule(gradients: dict) -> None:
    for name, (ours, baseline, reference) in gradients.items():
        try:
            assert_close_by_rule(ours, baseline, reference)
        except AssertionError as error:
            raise AssertionError(f"d{name}: {error}") from None


def _chunked_reference(u, k, grad, scale, chunk: int = 96, **operands) -> dict[str, torch.Tensor]:
    """long_conv_backward_reference in fp64, a block of channels at a time (real sizes would not fit at once)."""
    pieces = []
    for start in range(0, u.shape[1], chunk):
        width = min(chunk, u.shape[1] - start)
        channels = {name: _channels(t, start, width, axis=0 if name == "D" else 1) for name, t in operands.items()}
        pieces.append(long_conv_backward_reference(_channels(u, start, width), _channels(k, start, width, axis=0),
                                                   _channels(grad, start, width), scale=scale, **channels))
    return {name: torch.cat([piece[name] for piece in pieces], dim=0 if name in ("k", "D") else 1)
            for name in pieces[0]}

"""The fused FFT long-convolution kernel (codegen/long_conv.py, templates/long_conv.py.jinja).

Every kernel case draws fresh random inputs the way FlashFFTConv's tests do (u scaled small,
filters with an exponential decay per channel), poisons `out` with NaN, launches the generated
kernel on the spectrum from filter_spectrum and holds it to the tolerance rule of
tests/numerics.py: the reference is long_conv_reference in fp64, the baseline the same torch.fft
code in the dtype under test.

Without CUDA the kernels run on Triton's interpreter on CPU tensors, so the grid covers each
value of B {1, 2}, H {3, 8, 111}, L {1, 100, 256, 1000, 1024, 4096}, dtype and fused operand set
rather than their product; `max_cols` shortens the in-register row to reach plans with many
column rows cheaply. With CUDA the same cases run compiled, and the `gpu` tests add real sizes.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

import codegen.long_conv
from codegen.long_conv import (
    MAX_FFT_COLS,
    MAX_SEQLEN,
    FFTPlan,
    LongConvSpec,
    config_space,
    default_config,
    fft_plan,
    filter_spectrum,
    kernel_name,
    long_conv_reference,
    plan_of,
    program_count,
    render_long_conv,
    unsupported_reason,
)
from models.h3 import fftconv_ref
from models.hyena import fftconv
from runtime.interpret import ensure_mode
from runtime.loader import load_source
from tests.numerics import assert_close_by_rule, poisoned_like

DEVICE = torch.device("cpu" if ensure_mode() else "cuda")
fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Case:
    """One kernel launch.

    operands: which of D, pre_gate, post_gate are fused ("", "D", "gates", "D+gates");
    layout "blh": u and the gates are transposed views of (B, L, H) tensors;
    taps: the filter's length (default L); max_cols: cap on the in-register row M;
    circular: the filter (taps >= L) is that of a circular convolution of period `taps`.
    """

    batch: int
    channels: int
    seqlen: int
    dtype: torch.dtype = fp32
    operands: str = ""
    layout: str = "bhl"
    taps: int | None = None
    scale: float = 1.0
    max_cols: int = MAX_FFT_COLS
    out_dtype: torch.dtype | None = None
    circular: bool = False

    @property
    def spec(self) -> LongConvSpec:
        return LongConvSpec(has_D="D" in self.operands, has_pre_gate="gates" in self.operands,
                            has_post_gate="gates" in self.operands)

    def __str__(self) -> str:
        parts = [f"b{self.batch}h{self.channels}l{self.seqlen}", str(self.dtype).removeprefix("torch.")]
        parts += [self.operands] if self.operands else []
        parts += [self.layout] if self.layout != "bhl" else []
        parts += [f"{'period' if self.circular else 'taps'}{self.taps}"] if self.taps else []
        parts += [f"scale{self.scale:g}"] if self.scale != 1.0 else []
        parts += [f"cols{self.max_cols}"] if self.max_cols != MAX_FFT_COLS else []
        parts += [f"out-{str(self.out_dtype).removeprefix('torch.')}"] if self.out_dtype else []
        return "-".join(parts)


CASES = [
    # every length with every dtype; P = 1 up to L 2048, P = 2 at 4096
    *(Case(1, 3, seqlen, fp32) for seqlen in (1, 100, 256, 1000, 1024, 4096)),
    *(Case(2, 8, seqlen, fp16, "D") for seqlen in (1, 100, 256, 1000, 1024, 4096)),
    *(Case(2, 3, seqlen, bf16, "D+gates") for seqlen in (1, 100, 256, 1000, 1024, 4096)),
    # 111 channels, odd batch (a row pair without its second row)
    Case(2, 111, 1, bf16, "gates"),
    Case(1, 111, 256, fp16),
    Case(3, 111, 1000, fp32, "D+gates"),
    Case(2, 111, 4096, bf16, "D"),
    Case(3, 8, 100, fp16, "gates"),
    # strided u and gates, a short filter, Hyena's 1/N scale, an fp32 out for bf16 u
    Case(2, 8, 1000, bf16, "D+gates", layout="blh"),
    Case(3, 3, 256, fp32, "gates", layout="blh"),
    Case(2, 8, 1000, fp16, "D", taps=17),
    Case(2, 3, 1024, fp32, "D", scale=0.25),
    Case(2, 3, 1000, bf16, "D+gates", out_dtype=fp32),
    # many column rows: P = 4, 8, 32 with short rows
    Case(2, 3, 1024, fp32, "D+gates", max_cols=512),
    Case(3, 2, 1000, bf16, "D", max_cols=256),
    Case(2, 1, 4096, fp16, "gates", max_cols=256),
    # the longest sequence a plan covers
    Case(2, 1, MAX_SEQLEN, bf16, "D"),
    # circular filters: S4's bidirectional one (period 2L), period L, an odd period with P = 4
    Case(2, 3, 100, fp32, "D", taps=200, circular=True),
    Case(1, 8, 256, bf16, "D+gates", taps=256, circular=True),
    Case(2, 3, 1000, fp16, "D", taps=1501, circular=True, max_cols=512),
]

GPU_CASES = [
    *(Case(64, 768, seqlen, bf16, "D") for seqlen in (1024, 2048, 4096, 8192, 16384)),
    Case(64, 768, 2048, bf16, "D+gates"),
    Case(8, 768, 65536, bf16, "D"),
    Case(64, 768, 4096, fp16, "D+gates", layout="blh"),
    Case(16, 111, 1000, fp32, "D+gates"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case: Case):
    assert_close_by_rule(*run_case(case))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_kernel_matches_reference_at_scale(case: Case):
    assert_close_by_rule(*run_case(case))


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1024, 4096])
def test_every_autotuning_candidate_runs(seqlen):
    case = Case(4, 96, seqlen, bf16, "D+gates")
    for config in config_space(fft_plan(seqlen)):
        assert_close_by_rule(*run_case(case, config=config))


def test_persistent_programs_loop_over_row_pairs(monkeypatch):
    """Two programs, each reusing its scratch for five row pairs in turn."""
    monkeypatch.setattr(codegen.long_conv, "MIN_PERSISTENT_PROGRAMS", 2)
    monkeypatch.setattr(codegen.long_conv, "SCRATCH_L2_BYTES", 0)
    case = Case(3, 5, 1000, bf16, "D+gates", max_cols=256)
    assert program_count(fft_plan(case.seqlen, case.max_cols), n_pairs=10) == 2
    assert_close_by_rule(*run_case(case))


def test_reference_matches_the_model_spellings():
    """H3's fftconv_ref and Hyena's fftconv (spectrum / 2L, norm="forward") are the reference with D."""
    u, k, D, _, _ = make_operands(Case(2, 3, 100, fp32, "D"))
    expected = long_conv_reference(u, k, D=D)
    torch.testing.assert_close(fftconv_ref(u, k, D), expected)
    torch.testing.assert_close(fftconv(u, k, D), expected)


def test_launcher_rejects_operands_it_was_not_generated_for():
    u, k, D, pre, _ = make_operands(Case(2, 3, 100, fp32, "D+gates"))
    k_f = filter_spectrum(k, 100)
    with pytest.raises(ValueError, match="rendered for"):
        load_kernel(LongConvSpec()).launch(u, k_f, poisoned_like(u), D=D)
    with pytest.raises(ValueError, match="rendered for"):
        load_kernel(LongConvSpec(has_D=True, has_pre_gate=True)).launch(u, k_f, poisoned_like(u), D=D)


def test_launcher_rejects_a_spectrum_too_short_for_the_sequence():
    u, k, _, _, _ = make_operands(Case(1, 3, 200, fp32))
    with pytest.raises(ValueError, match="cannot convolve 200 steps"):
        load_kernel(LongConvSpec()).launch(u, filter_spectrum(k[:, :100], 100), poisoned_like(u))


# -- spec, plan, spectrum, configs -----------------------------------------------------------


@pytest.mark.parametrize("spec, name", [
    (LongConvSpec(), "long_conv"),
    (LongConvSpec(has_D=True), "long_conv_D"),
    (LongConvSpec(has_D=True, has_pre_gate=True, has_post_gate=True), "long_conv_D_pre_gate_post_gate"),
    (LongConvSpec(has_post_gate=True), "long_conv_post_gate"),
])
def test_kernel_name(spec, name):
    assert kernel_name(spec) == name


def test_spec_for_args():
    gate = torch.ones(1, 1, 1)
    assert LongConvSpec.for_args(D=torch.ones(1), post_gate=gate) == LongConvSpec(has_D=True, has_post_gate=True)


@pytest.mark.parametrize("has_D", [False, True])
@pytest.mark.parametrize("gates", [(False, False), (True, False), (False, True), (True, True)])
def test_every_variant_renders_valid_python(has_D, gates):
    source = render_long_conv(LongConvSpec(has_D, *gates))
    compile(source, "<long_conv>", "exec")
    assert "def launch(u, k_f, out, *, D=None, pre_gate=None, post_gate=None, config=None):" in source


@pytest.mark.parametrize("seqlen, max_cols, plan", [
    (1, MAX_FFT_COLS, FFTPlan(1, 16, 16)),
    (128, MAX_FFT_COLS, FFTPlan(1, 16, 16)),
    (129, MAX_FFT_COLS, FFTPlan(1, 32, 16)),
    (1000, MAX_FFT_COLS, FFTPlan(1, 64, 32)),
    (2048, MAX_FFT_COLS, FFTPlan(1, 64, 64)),
    (2049, MAX_FFT_COLS, FFTPlan(2, 64, 64)),
    (MAX_SEQLEN, MAX_FFT_COLS, FFTPlan(32, 64, 64)),
    (4096, 256, FFTPlan(32, 16, 16)),
])
def test_fft_plan(seqlen, max_cols, plan):
    assert fft_plan(seqlen, max_cols) == plan
    assert plan.n >= 2 * seqlen


def test_fft_plan_refuses_sequences_past_its_rows():
    with pytest.raises(ValueError, match="no FFT plan"):
        fft_plan(MAX_SEQLEN + 1)


def test_filter_spectrum_holds_scaled_bins_in_kernel_order():
    """k_f[h, :, k1, a, b] = DFT_N(k)[k1 + P (a + M1 b)] * scale / N, as real and imaginary planes."""
    k = torch.randn(3, 1000, dtype=torch.float64)
    k_f = filter_spectrum(k, 1000, scale=0.5, max_cols=256)
    plan = plan_of(k_f, 1000)
    assert plan == FFTPlan(8, 16, 16) and k_f.dtype == fp32
    spectrum = torch.fft.fft(k, n=plan.n) * 0.5 / plan.n
    for k1, a, b in [(0, 0, 0), (3, 5, 7), (7, 15, 15), (1, 0, 9)]:
        expected = spectrum[:, k1 + plan.rows * (a + plan.m1 * b)]
        torch.testing.assert_close(k_f[:, 0, k1, a, b].double(), expected.real, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(k_f[:, 1, k1, a, b].double(), expected.imag, atol=1e-7, rtol=1e-5)


SPECTRUM_CASES = [  # (channels, L, taps, max_cols, dtype, scale, layout): P = 1, 8 and 32, short filters,
    # strided ones (k as a transposed copy; one filter broadcast over the channels, stride 0)
    (3, 1, 1, MAX_FFT_COLS, fp32, 1.0, "rows"),
    (3, 1000, 1000, MAX_FFT_COLS, fp32, 1.0, "rows"),
    (5, 100, 17, MAX_FFT_COLS, bf16, 0.5, "columns"),
    (2, 2048, 2048, MAX_FFT_COLS, fp16, 1.0, "rows"),
    (3, 1000, 999, 256, fp32, 0.25, "columns"),
    (2, 4096, 4000, 256, bf16, 1.0, "rows"),
    (4, 1000, 1000, 256, fp32, 1.0, "broadcast"),
]


@pytest.mark.parametrize("channels, seqlen, taps, max_cols, dtype, scale, layout", SPECTRUM_CASES,
                         ids=lambda value: str(value).removeprefix("torch."))
def test_spectrum_kernel_matches_filter_spectrum(channels, seqlen, taps, max_cols, dtype, scale, layout):
    """The generated module's spectrum kernel against filter_spectrum's torch.fft in fp32, both held
    to the fp64 transform, in units where the bins are of order one, as the rule's eps assumes: an
    unscaled bin over sqrt(taps), the size of a sum of `taps` standard normal draws. (In bins alone,
    values up to ~200 make that eps smaller than an fp32 ulp of them, and the rule fails by chance
    about one draw in twenty at L 2048.)"""
    k = torch.randn(channels, taps, device=DEVICE).to(dtype)
    k = {"rows": k, "columns": k.t().contiguous().t(), "broadcast": k[:1].expand(channels, taps)}[layout]
    ours = load_kernel(LongConvSpec()).spectrum(k, seqlen, scale=scale, max_cols=max_cols)
    baseline = filter_spectrum(k, seqlen, scale=scale, max_cols=max_cols)
    plan = plan_of(ours, seqlen)
    assert plan == fft_plan(seqlen, max_cols)
    exact = torch.fft.fft(k.double(), n=plan.n)
    exact = torch.view_as_real(exact).view(channels, plan.m2, plan.m1, plan.rows, 2).permute(0, 4, 3, 2, 1)
    size = math.sqrt(taps)
    unit = plan.n / scale / size
    assert_close_by_rule(ours * unit, baseline * unit, exact / size)


def test_spectrum_kernel_refuses_filters_it_does_not_compute():
    module = load_kernel(LongConvSpec())
    for k, seqlen in ((torch.randn(3, 100, dtype=torch.float64), 100), (torch.randn(3, 101), 100),
                      (torch.randn(3, 0), 100), (torch.randn(2, 3, 100), 100)):
        with pytest.raises(ValueError, match="spectrum takes a filter"):
            module.spectrum(k.to(DEVICE), seqlen)


def test_program_count():
    assert program_count(FFTPlan(1, 64, 64), 10_000) == 10_000
    assert program_count(FFTPlan(2, 64, 64), 10_000) == codegen.long_conv.SCRATCH_L2_BYTES // (8 * 8192)
    assert program_count(FFTPlan(32, 64, 64), 10_000) == codegen.long_conv.MIN_PERSISTENT_PROGRAMS
    assert program_count(FFTPlan(32, 64, 64), 3) == 3


def test_default_config():
    assert default_config(FFTPlan(1, 16, 16)) == {"BLOCK_COLS": 256, "num_warps": 4, "num_stages": 1}
    assert default_config(FFTPlan(2, 64, 64)) == {"BLOCK_COLS": 2048, "num_warps": 8, "num_stages": 1}
    assert default_config(FFTPlan(32, 64, 64))["BLOCK_COLS"] == 128


def test_config_space():
    in_registers, through_scratch = config_space(FFTPlan(1, 64, 32)), config_space(FFTPlan(8, 64, 64))
    assert len(in_registers) == 3 * 2
    assert {c["BLOCK_COLS"] for c in through_scratch} == {256, 512, 1024}


# -- unsupported_reason ----------------------------------------------------------------------


def _operands(u=(2, 3, 100), k=(3, 100), dtype=fp16, **optional):
    """Keyword arguments of unsupported_reason: random u (dtype) and k (fp32) of these shapes, then `optional`."""
    return dict(u=torch.randn(u).to(dtype), k=torch.randn(k), **optional)


@pytest.mark.parametrize("operands, expected", [
    (_operands(u=(3, 100)), "u must have 3 dimensions"),
    (_operands(k=(3, 1, 100)), "k must have 2 dimensions"),
    (_operands(dtype=torch.float64), "u has dtype torch.float64"),
    (_operands(D=torch.ones(3, dtype=torch.int32)), "D has dtype torch.int32"),
    (_operands(D=torch.ones(3, device="meta")), "different devices"),
    (_operands(D=torch.ones(4)), "D has shape (4,), expected (3,)"),
    (_operands(pre_gate=torch.ones(2, 3, 99, dtype=fp16)), "pre_gate has shape"),
    (_operands(out=torch.ones(1, 3, 100, dtype=fp16)), "out has shape"),
    (_operands(k=(4, 100)), "k has 4 channels, u has 3"),
    (_operands(k=(3, 101)), "longer than the sequence"),
    (_operands(k=(3, 99), circular=True), "a circular filter of period 99 < L = 100"),
    (_operands(u=(2, 3, 0), k=(3, 0)), "empty"),
    (_operands(u=(1, 1, MAX_SEQLEN + 1), k=(1, 8)), f"sequence length {MAX_SEQLEN + 1} > {MAX_SEQLEN}"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_unsupported_reason(operands, expected):
    assert expected in unsupported_reason(**operands)


def test_supported_operands_have_no_reason():
    u = torch.randn(2, 3, 100, dtype=bf16)
    reason = unsupported_reason(u, torch.randn(3, 30, dtype=torch.float64), D=torch.randn(3), pre_gate=u,
                                post_gate=torch.randn(2, 3, 100), out=torch.empty(2, 3, 100))
    assert reason is None


# -- helpers ---------------------------------------------------------------------------------


def load_kernel(spec: LongConvSpec):
    module, _ = load_source(kernel_name(spec), render_long_conv(spec))
    return module


def run_case(case: Case, config: dict | None = None):
    """(kernel output, baseline in case.dtype (or out_dtype), fp64 reference) for one case."""
    u, k, D, pre_gate, post_gate = make_operands(case)
    k_f = filter_spectrum(k, case.seqlen, scale=case.scale, max_cols=case.max_cols, circular=case.circular)
    out = poisoned_like(torch.empty(u.shape, dtype=case.out_dtype or case.dtype, device=DEVICE))
    load_kernel(case.spec).launch(u, k_f, out, D=D, pre_gate=pre_gate, post_gate=post_gate, config=config)
    baseline = long_conv_reference(u, k, D=D, pre_gate=pre_gate, post_gate=post_gate, scale=case.scale,
                                   circular=case.circular)
    reference = _chunked_reference(u, k, D, pre_gate, post_gate, case.scale, case.circular)
    return out, baseline.to(out.dtype), reference


def _chunked_reference(u, k, D, pre_gate, post_gate, scale, circular, chunk: int = 96):
    """long_conv_reference in fp64, a block of channels at a time (real sizes would not fit at once)."""
    pieces = []
    for start in range(0, u.shape[1], chunk):
        width = min(chunk, u.shape[1] - start)
        pieces.append(long_conv_reference(
            _channels(u, start, width), _channels(k, start, width, axis=0), D=_channels(D, start, width, axis=0),
            pre_gate=_channels(pre_gate, start, width), post_gate=_channels(post_gate, start, width), scale=scale,
            circular=circular))
    return torch.cat(pieces, dim=1)


def _channels(tensor: torch.Tensor | None, start: int, width: int, axis: int = 1) -> torch.Tensor | None:
    """Channels [start, start + width) of `tensor` (on `axis`) in fp64; None stays None."""
    return None if tensor is None else tensor.narrow(axis, start, width).double()


def _generator(case: Case, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case}/{salt}".encode()))


def _sequence(case: Case, salt: str, scale: float = 1.0) -> torch.Tensor:
    """A random (B, H, L) tensor on DEVICE in case.dtype, or a transposed view of a (B, L, H) one."""
    generator = _generator(case, salt)
    if case.layout == "blh":
        tensor = torch.randn(case.batch, case.seqlen, case.channels, generator=generator).transpose(1, 2)
    else:
        tensor = torch.randn(case.batch, case.channels, case.seqlen, generator=generator)
    return (tensor * scale).to(device=DEVICE, dtype=case.dtype)


def make_operands(case: Case):
    """u scaled by 0.1; filters k[h, t] = randn * exp(-r_h t) with decay rates from 2/taps to 20/taps
    (circular ones decay from both ends, t -> min(t, taps - t)); D, pre_gate and post_gate standard
    normal (or None when not fused)."""
    taps = case.taps or case.seqlen
    g = _generator(case, "filter")
    rates = torch.linspace(2.0, 20.0, case.channels)[:, None] / taps
    distance = torch.arange(taps)
    distance = torch.minimum(distance, taps - distance) if case.circular else distance
    k = torch.randn(case.channels, taps, generator=g) * torch.exp(-rates * distance)
    D = torch.randn(case.channels, generator=g) if case.spec.has_D else None
    pre_gate = _sequence(case, "pre_gate") if case.spec.has_pre_gate else None
    post_gate = _sequence(case, "post_gate") if case.spec.has_post_gate else None
    return _sequence(case, "u", scale=0.1), k.to(DEVICE), None if D is None else D.to(DEVICE), pre_gate, post_gate


"""Robustness of the long_conv, short_conv, ssm_scan and sparse_mlp passes (test_robustness.py does attention).

For each family, with the modules of its pass test:

    shape change mid-run     one graph per shape (dynamic=False); under automatic dynamic shapes a
                             symbolic graph is fused or left to PyTorch with a reason in report()
    layouts                  transposed, strided, broadcast and channels-last inputs run the kernel
    NaN / inf                at the positions eager has them, the tolerance rule elsewhere; where the
                             math fixes eager's pattern it is asserted too: an FFT spreads a value over
                             its (batch, channel) row, a width-K causal conv over the next K steps, a
                             scan forward in time only, an MLP over the token's row
    tiny sizes               batch 1, sequence lengths 1 and 2, a single neuron
    sizes beyond a kernel    run in PyTorch with the limit named in report()
    requires_grad            the kernel forward, the backward recomputed in PyTorch: eager's gradients
    property tests           hypothesis over shapes (and dtypes), against eager by the tolerance rule

Every test asserts that the pass fired and, where a kernel should run, that none fell back; known
bugs are strict xfails naming the cause.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compiler
from runtime.dispatch import SPARSE_RECOMPUTED
from tests.compiler.equivalence import assert_compiles_equivalent, cast_inputs
from tests.compiler.test_long_conv_pass import (
    FlashConv, GatedConv, GroupedConv, PaddedShortConv, PlainConv, ReferenceShortConv, ShortConv, TransposedConv,
    sequence,
)
from tests.compiler.test_robustness import assert_same_special_values, run
from tests.compiler.test_sparse_mlp_pass import GatheredMLP, MaskedMLP
from tests.compiler.test_ssm_scan_pass import Case, ReferenceScan, scan_inputs
from tests.numerics import assert_close_by_rule

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
NAN, INF = float("nan"), float("inf")
PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning",
    "ignore::RuntimeWarning",  # the interpreter's numpy arithmetic on NaN and inf, as eager computes it
)


# -- helpers ---------------------------------------------------------------------------------------
def assert_kernel_ran(compiled, pattern: str, count: int = 1) -> None:
    """`count` fused `pattern` ops, none of which fell back to PyTorch."""
    report = compiled.report()
    assert compiled.patterns == [pattern] * count, report
    assert f"{pattern} op" not in report, report


def assert_fell_back(compiled, pattern: str, reason: str) -> None:
    """One fused `pattern` op that ran in PyTorch, for `reason`."""
    report = compiled.report()
    assert compiled.patterns == [pattern], report
    (line,) = [line for line in report.splitlines() if line.lstrip().startswith(f"{pattern} op ")]
    assert f"ran in PyTorch 1x: {reason}" in line, report


def assert_matches_eager(module, args, ours) -> None:
    """The tolerance rule against eager in the inputs' dtype and an fp64 copy of the module."""
    with torch.no_grad():
        baseline = module(*args)
        reference = copy.deepcopy(module).double()(*cast_inputs(args, torch.float64))
    assert_close_by_rule(ours, baseline, reference)


def nonfinite_at(shape, *index) -> torch.Tensor:
    """A bool mask of `shape`, True at `index` (slices allowed)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[index] = True
    return mask


def transposed_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values with its last two dims swapped in memory: the channels-last layout of a (B, C, L) tensor."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def named(value) -> str | None:
    """Test ids: a builder function's or a module class's name."""
    return value.__name__ if callable(value) else None


def scan_case(**fields) -> tuple[ReferenceScan, list]:
    return ReferenceScan(), list(scan_inputs(Case(**fields)))


def mlp_case(form: str, batch: int, d: int = 16, ffn: int = 48, k: int = 5, activation: str = "relu", seed: int = 0):
    """(module, [x (batch, d), idx (k,) or its 0/1 float mask (ffn,)]) for DejaVu's gathered or masked MLP."""
    torch.manual_seed(seed)
    module = (GatheredMLP if form == "gathered" else MaskedMLP)(d, ffn, activation).eval()
    idx = torch.randperm(ffn)[:k]
    selector = idx if form == "gathered" else torch.zeros(ffn).index_fill(0, idx, 1.0)
    return module, [torch.randn(batch, d), selector]


# -- shape changes mid-run -------------------------------------------------------------------------
def long_conv_calls():
    """Lengths on both sides of the 2048 split between the in-register and the scratch FFT."""
    torch.manual_seed(0)
    module = FlashConv(3, 16)
    calls = [module.inputs(batch, length) for batch, length in ((2, 32), (1, 100), (2, 32), (1, 2100))]
    return module, calls


def short_conv_calls():
    torch.manual_seed(0)
    calls = [(sequence(batch, 5, length, seed=length),) for batch, length in ((2, 10), (2, 33), (1, 33), (2, 10))]
    return ShortConv(5, 4, "F.silu"), calls


def ssm_scan_calls():
    calls = [scan_inputs(Case(seqlen=length, batch=batch)) for length, batch in ((4, 1), (7, 1), (4, 2), (4, 1))]
    return ReferenceScan(), calls


def sparse_mlp_calls():
    module, _ = mlp_case("gathered", 1)
    calls = [[torch.randn(batch, 16), torch.randperm(48)[:k]] for batch, k in ((1, 5), (3, 5), (3, 9), (1, 5))]
    return module, calls


SHAPE_CHANGES = {"long_conv": long_conv_calls, "short_conv": short_conv_calls, "ssm_scan": ssm_scan_calls,
                 "sparse_mlp": sparse_mlp_calls}


@pytest.mark.parametrize("pattern", SHAPE_CHANGES)
def test_shape_change_mid_run_recompiles(pattern):
    """dynamic=False: each new shape is a new graph with its own fused op; a repeated shape reuses its graph."""
    module, calls = SHAPE_CHANGES[pattern]()
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        for args in calls:
            assert_matches_eager(module, args, compiled(*args))
    assert_kernel_ran(compiled, pattern, count=3)


@pytest.mark.parametrize("pattern", [
    "short_conv",
    "sparse_mlp",
    "long_conv",
    "ssm_scan",
])
def test_symbolic_shapes_are_fused_or_explained(pattern):
    """dynamic=None: a size that changes becomes symbolic; every graph fuses the pattern or report() says why not."""
    module, calls = SHAPE_CHANGES[pattern]()
    compiled = compiler.compile(module, dynamic=None, strict=True)
    with torch.no_grad():
        for args in calls:
            assert_matches_eager(module, args, compiled(*args))
    report = compiled.report()
    assert compiled.patterns[0] == pattern, report
    for graph in range(compiled._report.graphs):
        assert f"[graph {graph}] {pattern}" in report, report


# -- layouts ---------------------------------------------------------------------------------------
def long_conv_time_major():
    torch.manual_seed(0)
    return FlashConv(5, 40), [sequence(2, 40, 5).transpose(1, 2)]


def long_conv_strided_time():
    torch.manual_seed(0)
    return FlashConv(5, 40), [sequence(2, 5, 80)[..., ::2]]


def long_conv_grouped_channels_last():
    torch.manual_seed(0)
    module = GroupedConv(3, 40)
    return module, [module.inputs(2, 40)[0].contiguous(memory_format=torch.channels_last)]


def long_conv_broadcast_gates():
    torch.manual_seed(0)
    module = GatedConv(3, 40)
    x, _, post = module.inputs(2, 40)
    batch_minor_post = post.transpose(0, 1).contiguous().transpose(0, 1)
    return module, [transposed_copy(x), sequence(1, 3, 1).expand(2, 3, 40), batch_minor_post]


def short_conv_time_major():
    torch.manual_seed(0)
    return ShortConv(5, 4, "F.silu"), [sequence(2, 40, 5).transpose(1, 2)]


def short_conv_strided_time():
    torch.manual_seed(0)
    return ShortConv(5, 4), [sequence(2, 5, 80)[..., ::2]]


def short_conv_channels_last():
    torch.manual_seed(0)
    return ShortConv(5, 3), [transposed_copy(sequence(2, 5, 40))]


def ssm_scan_time_major():
    """u, delta, z, A stored transposed; grouped B and C in channels-last (b, g, n, L) layout."""
    module, (u, delta, A, B, C, D, z, bias) = scan_case(seqlen=6, batch=2, groups=2)
    B, C = (t.contiguous(memory_format=torch.channels_last) for t in (B, C))
    return module, [transposed_copy(u), transposed_copy(delta), transposed_copy(A), B, C, D, transposed_copy(z), bias]


def ssm_scan_strided_vectors():
    """D and delta_bias as every other element of a (d, 2) tensor, B and C batch-major copies."""
    module, (u, delta, A, B, C, D, z, bias) = scan_case(seqlen=6, batch=2)
    D, bias = (torch.stack([t, t + 1], dim=1)[:, 0] for t in (D, bias))
    B, C = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (B, C))
    return module, [u, delta, A, B, C, D, z, bias]


def sparse_mlp_transposed_rows():
    module, (_, idx) = mlp_case("gathered", 3)
    return module, [torch.randn(16, 3).t(), idx]


def sparse_mlp_channels_last():
    module, (_, mask) = mlp_case("masked", 2)
    return module, [torch.randn(2, 3, 4, 16).contiguous(memory_format=torch.channels_last), mask]


def sparse_mlp_strided_mask():
    module, (x, mask) = mlp_case("masked", 3)
    return module, [x, torch.stack([mask, 1 - mask], dim=1)[:, 0]]


def sparse_mlp_strided_idx():
    """Every other element of 10 distinct neurons: the 5 read contiguously are another set."""
    module, (x, _) = mlp_case("gathered", 3)
    return module, [x, torch.randperm(48)[:10][::2]]


@pytest.mark.parametrize("build, pattern", [
    (long_conv_time_major, "long_conv"),
    (long_conv_strided_time, "long_conv"),
    (long_conv_grouped_channels_last, "long_conv"),
    (long_conv_broadcast_gates, "long_conv"),
    (short_conv_time_major, "short_conv"),
    (short_conv_strided_time, "short_conv"),
    (short_conv_channels_last, "short_conv"),
    (ssm_scan_time_major, "ssm_scan"),
    (ssm_scan_strided_vectors, "ssm_scan"),
    (sparse_mlp_transposed_rows, "sparse_mlp"),
    (sparse_mlp_channels_last, "sparse_mlp"),
    (sparse_mlp_strided_mask, "sparse_mlp"),
    (sparse_mlp_strided_idx, "sparse_mlp"),
], ids=named)
def test_non_contiguous_and_channels_last_inputs(build, pattern):
    module, args = build()
    assert any(not a.is_contiguous() for a in args)
    compiled, ours, _ = run(module, *args)
    assert_kernel_ran(compiled, pattern)
    assert_matches_eager(module, args, ours)


# -- NaN and inf: long convolutions ----------------------------------------------------------------
@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("operand, reach", [(0, "row"), (1, "row"), (2, "point")], ids=["u", "pre_gate", "post_gate"])
def test_long_conv_special_values_follow_the_fft(value, operand, reach):
    """A value in u or the pre-gate goes through the FFT and spoils its whole (batch, channel) row; one in the
    post-gate multiplies one output."""
    torch.manual_seed(0)
    module = GatedConv(3, 24)
    args = list(module.inputs(1, 24))
    args[operand][0, 1, 7] = value
    compiled, ours, eager = run(module, *args)
    assert_kernel_ran(compiled, "long_conv")
    expected = nonfinite_at(eager.shape, 0, 1, slice(None) if reach == "row" else 7)
    assert torch.equal(~eager.isfinite(), expected)
    assert_same_special_values(ours, eager)


@pytest.mark.parametrize("value", [NAN, INF])
def test_long_conv_special_values_stay_in_their_batch_row(value):
    """Each batch row is its own FFT: a non-finite value never reaches a neighbouring row."""
    torch.manual_seed(0)
    module = PlainConv(1, 16)
    (u,) = module.inputs(2, 16)
    u[0, 0, 3] = value
    compiled, ours, eager = run(module, u)
    assert_kernel_ran(compiled, "long_conv")
    assert torch.equal(~eager.isfinite(), nonfinite_at(eager.shape, 0))
    assert_same_special_values(ours, eager)


def test_long_conv_rows_of_different_scales_keep_their_precision():
    """The tolerance rule row by row: a quiet batch row next to a loud one is as accurate as eager makes it."""
    torch.manual_seed(0)
    module = PlainConv(1, 256)
    (u,) = module.inputs(2, 256)
    u[0] *= 1e4
    u[1] *= 1e-4
    compiled, ours, eager = run(module, u)
    assert_kernel_ran(compiled, "long_conv")
    n = 2 * u.shape[-1]
    spectrum = torch.fft.rfft(u.double(), n=n) * torch.fft.rfft(module.k.detach().double(), n=n)
    reference = torch.fft.irfft(spectrum, n=n)[..., :u.shape[-1]]
    for row in range(2):
        assert_close_by_rule(ours[row], eager[row], reference[row])


# -- NaN and inf: short convolutions ---------------------------------------------------------------
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("activation", ["none", "F.silu", "F.relu", "nn.GELU"])
def test_short_conv_special_values_reach_the_next_width_steps(value, activation):
    """x[t] feeds outputs t .. t + K - 1 of its channel (silu(-inf) is NaN, so the kind may change;
    relu and gelu turn -inf into 0, so there only the values are compared with eager's)."""
    torch.manual_seed(0)
    width = 4
    x = sequence(2, 3, 20)
    x[1, 2, 5] = value
    compiled, ours, eager = run(ShortConv(3, width, activation), x)
    assert_kernel_ran(compiled, "short_conv")
    if activation in ("none", "F.silu"):
        assert torch.equal(~eager.isfinite(), nonfinite_at(eager.shape, 1, 2, slice(5, 5 + width)))
    assert_same_special_values(ours, eager)


# -- NaN and inf: selective scans ------------------------------------------------------------------
SCAN_OPERANDS = {"u": 0, "delta": 1, "B": 3, "C": 4, "z": 6}
NAN_AT = 5  # the step poisoned below; y is (b=2, d=8, L=20)


def poisoned_scan(operand: str, value: float):
    """(ours, eager) for a scan over several BLOCK_L chunks with operand[0, 1, NAN_AT] = value."""
    module, args = scan_case(seqlen=20, dstate=16, dim=8, batch=2)
    args[SCAN_OPERANDS[operand]][0, 1, NAN_AT] = value
    compiled, ours, eager = run(module, *args)
    assert_kernel_ran(compiled, "ssm_scan")
    assert compiled.kernels[0].config["BLOCK_L"] < 20 - NAN_AT
    return ours, eager


@pytest.mark.parametrize("operand, reach", [
    ("u", (0, 1, slice(NAN_AT, None))),
    ("delta", (0, 1, slice(NAN_AT, None))),
    ("B", (0, slice(None), slice(NAN_AT, None))),
    ("C", (0, slice(None), NAN_AT)),
    ("z", (0, 1, NAN_AT)),
])
def test_scan_nan_propagates_forward_in_time_only(operand, reach):
    """Through the state (u, delta: one channel; B: every channel) NaN reaches every later step, across
    chunks; through the readout C or the gate z only its own step."""
    ours, eager = poisoned_scan(operand, NAN)
    assert torch.equal(eager.isnan(), nonfinite_at(eager.shape, *reach))
    assert_same_special_values(ours, eager)


@pytest.mark.parametrize("value", [INF, -INF])
@pytest.mark.parametrize("operand", ["u", "delta", "B"])
def test_scan_inf_matches_eager(operand, value):
    ours, eager = poisoned_scan(operand, value)
    assert eager[1].isfinite().all()
    assert_same_special_values(ours, eager)


# -- NaN and inf: sparse MLPs ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("form", ["gathered", "masked"])
def test_sparse_mlp_special_values_spoil_only_their_token(form, activation, value):
    """The masked form multiplies every neuron by the mask (inf * 0 = NaN in a dropped neuron), so
    non-finite inputs run it in PyTorch; the gathered form never sees dropped neurons."""
    module, (x, selector) = mlp_case(form, 3, activation=activation)
    x[1, 4] = value
    compiled, ours, eager = run(module, x, selector)
    if form == "masked":
        assert_fell_back(compiled, "sparse_mlp", "non-finite inputs")
    else:
        assert_kernel_ran(compiled, "sparse_mlp")
    assert eager[[0, 2]].isfinite().all()
    assert_same_special_values(ours, eager)


def test_sparse_mlp_nan_in_the_mask_spoils_every_output():
    """A NaN mask entry scales a neuron by NaN: the kernels apply the mask's values (not 0/1, so
    row by row) and give eager's all-NaN output."""
    module, (x, mask) = mlp_case("masked", 3)
    mask[7] = NAN
    compiled, ours, eager = run(module, x, mask)
    assert_kernel_ran(compiled, "sparse_mlp")
    assert eager.isnan().all()
    assert_same_special_values(ours, eager)


# -- batch 1 and tiny sequences --------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("form", [FlashConv, GatedConv, TransposedConv], ids=named)
def test_long_conv_tiny_sequences(form, length):
    torch.manual_seed(0)
    module = form(3, length)
    compiled = assert_compiles_equivalent(module, module.inputs(1, length), fp32, "long_conv")
    assert_kernel_ran(compiled, "long_conv")


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("width", [2, 4, 8])
def test_short_conv_tiny_sequences(width, length):
    """Sequences shorter than the filter: most taps read the causal zero padding."""
    torch.manual_seed(0)
    compiled = assert_compiles_equivalent(ShortConv(3, width, "F.silu"), (sequence(1, 3, length),), fp32, "short_conv")
    assert_kernel_ran(compiled, "short_conv")


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("groups", [0, 2])
def test_scan_tiny_sequences(groups, length):
    module, args = scan_case(seqlen=length, batch=1, groups=groups)
    compiled = assert_compiles_equivalent(module, args, fp32, "ssm_scan")
    assert_kernel_ran(compiled, "ssm_scan")


@pytest.mark.parametrize("form", ["gathered", "masked"])
@pytest.mark.parametrize("shape, d, ffn", [((16,), 16, 48), ((1, 16), 16, 48), ((1, 1, 16), 16, 48), ((1, 1), 1, 1)],
                         ids=["1d", "one-row", "one-token", "one-neuron"])
def test_sparse_mlp_single_token(form, shape, d, ffn):
    module, (_, selector) = mlp_case(form, 1, d=d, ffn=ffn, k=1)
    compiled = assert_compiles_equivalent(module, (torch.randn(shape), selector), fp32, "sparse_mlp")
    assert_kernel_ran(compiled, "sparse_mlp")


# -- sizes beyond the kernels ----------------------------------------------------------------------
def long_conv_65537_steps():
    torch.manual_seed(0)
    module = PlainConv(1, 8)
    return module, list(module.inputs(1, 65537))


def short_conv_65536_rows():
    torch.manual_seed(0)
    return ShortConv(1, 3), [sequence(65536, 1, 2)]


def ssm_scan_257_states():
    return scan_case(seqlen=2, dstate=257, dim=2)


def ssm_scan_65536_rows():
    return scan_case(seqlen=1, dim=1, batch=65536)


def sparse_mlp_no_neuron():
    module, (x, _) = mlp_case("gathered", 3)
    return module, [x, torch.tensor([], dtype=torch.long)]


@pytest.mark.parametrize("build, pattern, reason", [
    (long_conv_65537_steps, "long_conv", "sequence length 65537 > 65536"),
    (short_conv_65536_rows, "short_conv", "batch 65536 exceeds the launch grid's limit of 65535"),
    (ssm_scan_257_states, "ssm_scan", "dstate 257 exceeds 256: the state tile must fit in registers"),
    (ssm_scan_65536_rows, "ssm_scan", "batch 65536 or groups 1 exceeds the launch grid's limit of 65535"),
    (sparse_mlp_no_neuron, "sparse_mlp", "idx selects 0 neurons, need 1 <= K <= F = 48"),
], ids=named)
def test_sizes_beyond_the_kernels_run_in_pytorch(build, pattern, reason):
    module, args = build()
    compiled, ours, _ = run(module, *args)
    assert_fell_back(compiled, pattern, reason)
    assert_matches_eager(module, args, ours)


def test_scan_at_the_state_limit_runs_the_kernel():
    module, args = scan_case(seqlen=2, dstate=256, dim=2)
    compiled = assert_compiles_equivalent(module, args, fp32, "ssm_scan")
    assert_kernel_ran(compiled, "ssm_scan")


# -- autograd --------------------------------------------------------------------------------------
def long_conv_gated():
    torch.manual_seed(0)
    module = GatedConv(3, 20)
    return module, list(module.inputs(2, 20))


def short_conv_silu():
    torch.manual_seed(0)
    return ShortConv(3, 4, "F.silu"), [sequence(2, 3, 20)]


def ssm_scan_grouped():
    return scan_case(seqlen=5, groups=2)


def sparse_mlp_gathered():
    return mlp_case("gathered", 3)


def sparse_mlp_masked():
    return mlp_case("masked", 3)


def gradients(fn, module, args):
    """(output, d sum(output) / d (floating inputs and parameters)) with every floating input requiring grad."""
    args = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*args)
    leaves = [a for a in args if a.requires_grad] + list(module.parameters())
    return out, torch.autograd.grad(out.sum(), leaves)


@pytest.mark.parametrize("build, pattern, backward_fallback", [
    (long_conv_gated, "long_conv", None),
    (short_conv_silu, "short_conv", None),
    (ssm_scan_grouped, "ssm_scan", None),
    (sparse_mlp_gathered, "sparse_mlp", SPARSE_RECOMPUTED),
    (sparse_mlp_masked, "sparse_mlp", SPARSE_RECOMPUTED),
], ids=named)
def test_requires_grad_gives_eager_gradients(build, pattern, backward_fallback):
    module, args = build()
    compiled = compiler.compile(module, strict=True)
    ours, our_grads = gradients(compiled, module, args)
    eager, eager_grads = gradients(module, module, args)
    if backward_fallback is None:  # backward kernels: nothing ran in PyTorch
        assert compiled.patterns == [pattern] and "ran in PyTorch" not in compiled.report(), compiled.report()
    else:  # the forward ran the kernel: no other fallback
        assert_fell_back(compiled, pattern, backward_fallback)
    torch.testing.assert_close(ours, eager)
    for ours_grad, eager_grad in zip(our_grads, eager_grads, strict=True):
        torch.testing.assert_close(ours_grad, eager_grad)


# -- property tests --------------------------------------------------------------------------------
DTYPES = st.sampled_from([fp32, bf16, fp16])


@PROPERTY
@given(form=st.sampled_from([FlashConv, PlainConv, GatedConv, TransposedConv]), batch=st.integers(1, 3),
       channels=st.integers(1, 9), length=st.integers(1, 1100), taps=st.floats(0.01, 1.0), dtype=DTYPES)
def test_property_long_conv_matches_eager(form, batch, channels, length, taps, dtype):
    torch._dynamo.reset()
    torch.manual_seed(length)
    module = form(channels, max(1, round(taps * length)))
    compiled = assert_compiles_equivalent(module, module.inputs(batch, length), dtype, "long_conv")
    assert_kernel_ran(compiled, "long_conv")


@PROPERTY
@given(form=st.sampled_from([ShortConv, PaddedShortConv, ReferenceShortConv]), batch=st.integers(1, 3),
       channels=st.integers(1, 40), length=st.integers(1, 300), width=st.integers(2, 8),
       silu=st.booleans(), transposed=st.booleans(), dtype=DTYPES)
def test_property_short_conv_matches_eager(form, batch, channels, length, width, silu, transposed, dtype):
    """ShortConv may take a (B, L, C) activation; PaddedShortConv spells silu as y * sigmoid(y)."""
    torch._dynamo.reset()
    torch.manual_seed(length)
    transposed = transposed and form is ShortConv
    activation = ("F.silu" if form is ShortConv else "sigmoid") if silu else "none"
    x = sequence(batch, length, channels) if transposed else sequence(batch, channels, length)
    compiled = assert_compiles_equivalent(form(channels, width, activation, transposed), (x,), dtype, "short_conv")
    assert_kernel_ran(compiled, "short_conv")


@PROPERTY
@given(length=st.integers(1, 10), dstate=st.integers(1, 24), per_group=st.integers(1, 5), groups=st.integers(0, 2),
       batch=st.integers(1, 2), D=st.booleans(), z=st.booleans(), bias=st.booleans(), dtype=DTYPES)
def test_property_scan_matches_eager(length, dstate, per_group, groups, batch, D, z, bias, dtype):
    torch._dynamo.reset()
    module, args = scan_case(seqlen=length, dstate=dstate, dim=per_group * max(groups, 1), batch=batch, groups=groups,
                             D=D, z=z, bias=bias, dtype=dtype)
    compiled = assert_compiles_equivalent(module, args, dtype, "ssm_scan")
    assert_kernel_ran(compiled, "ssm_scan")


@PROPERTY
@given(form=st.sampled_from(["gathered", "masked"]), batch=st.integers(1, 20), d=st.integers(1, 70),
       ffn=st.integers(1, 200), density=st.floats(0.0, 1.0), activation=st.sampled_from(["relu", "gelu", "gelu_tanh"]),
       dtype=DTYPES)
def test_property_sparse_mlp_matches_eager(form, batch, d, ffn, density, activation, dtype):
    torch._dynamo.reset()
    k = max(1, round(density * ffn))
    module, args = mlp_case(form, batch, d=d, ffn=ffn, k=k, activation=activation, seed=batch * 1000 + ffn)
    compiled = assert_compiles_equivalent(module, args, dtype, "sparse_mlp")
    assert_kernel_ran(compiled, "sparse_mlp")

"""The ssm_scan pass rolls selective-scan loops back into one scan kernel, and the result matches eager.

Every fusing test asserts the pass fired (ssm_scan ops in the compiled graph) and that outputs are
within the tolerance rule of fp64 eager. The scan spellings come from models.mamba
(`selective_scan_ref`: einsum readout, stack), Hugging Face's `mamba_selective_scan` (broadcast
discretisation, matmul readout, its associative_scan path) and a third spelling below (sum
readout, cat of unsqueezed steps, repeat_interleave groups). Triton's interpreter scans about
4 (batch, channel, state, step) elements per ms and Dynamo unrolls about 70 steps per second
here, so the cases form a covering grid of small sizes rather than a product; L 1000 goes through
the rolled route (register_rolled), which Dynamo does not unroll.
"""
from __future__ import annotations

import copy
import functools
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.associative_scan import associative_scan_op

import compiler
from models.mamba import MambaConfig, MambaLM, selective_scan_ref, selective_state_update_ref
from tests.compiler.equivalence import assert_compiles_equivalent
from tests.numerics import assert_close_by_rule

transformers = pytest.importorskip("transformers")
from transformers.models.mamba.modeling_mamba import mamba_selective_scan  # noqa: E402

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Case:
    """One scan: groups 0 means B, C of shape (b, n, L), g >= 1 (b, g, n, L)."""

    seqlen: int = 7
    dstate: int = 4
    dim: int = 4
    batch: int = 1
    groups: int = 0
    D: bool = True
    z: bool = True
    bias: bool = True
    dtype: torch.dtype = fp32

    def __str__(self) -> str:
        flags = "".join(name for name in ("D", "z", "bias") if getattr(self, name)) or "plain"
        return (f"L{self.seqlen}-n{self.dstate}-d{self.dim}-b{self.batch}-g{self.groups}-{flags}-"
                f"{str(self.dtype).removeprefix('torch.')}")


def scan_inputs(case: Case) -> tuple:
    """(u, delta, A, B, C, D, z, delta_bias) at Mamba's scales; absent features are None."""
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    b, d, L, n = case.batch, case.dim, case.seqlen, case.dstate
    bc = (b, case.groups, n, L) if case.groups else (b, n, L)
    bias = torch.log(torch.expm1(torch.exp(torch.empty(d).uniform_(-6.9, -2.3, generator=g))))
    return (
        torch.randn(b, d, L, generator=g),
        0.5 * torch.randn(b, d, L, generator=g) + (0 if case.bias else bias[:, None]),
        -torch.exp(torch.randn(d, n, generator=g) * 0.5),
        torch.randn(*bc, generator=g),
        torch.randn(*bc, generator=g),
        torch.randn(d, generator=g) if case.D else None,
        torch.randn(b, d, L, generator=g) if case.z else None,
        bias if case.bias else None,
    )


class ReferenceScan(nn.Module):
    """models.mamba.selective_scan_ref (mamba_ssm's loop): einsum discretisation and readout, stack."""

    def __init__(self, last_state: bool = False):
        super().__init__()
        self.last_state = last_state

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                  return_last_state=self.last_state)


class HuggingFaceScan(nn.Module):
    """transformers' mamba_selective_scan: broadcast discretisation, matmul readout, stack(dim=-1)."""

    def __init__(self, associative: bool = False):
        super().__init__()
        self.associative = associative

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None):
        return mamba_selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                    use_associative_scan=self.associative)


class SumCatScan(nn.Module):
    """Time-major sequences (b, L, d), per-group B and C through repeat_interleave, a mul + sum
    readout, cat of unsqueezed steps, and the state carried as (b, n, d)."""

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None):
        u, delta = u.transpose(1, 2), F.softplus(delta + delta_bias[:, None]).transpose(1, 2)
        repeats = u.shape[2] // B.shape[1]
        B, C = (x.repeat_interleave(repeats, dim=1).permute(0, 3, 2, 1) for x in (B, C))  # (b, L, n, d)
        decay = torch.exp(delta[:, :, None, :] * A.t())
        update = delta[:, :, None, :] * B * u[:, :, None, :]
        h = torch.zeros_like(decay[:, 0])
        ys = []
        for t in range(u.shape[1]):
            h = h * decay[:, t] + update[:, t]
            ys.append((C[:, t] * h).sum(dim=1).unsqueeze(1))
        y = torch.cat(ys, dim=1) + u * D
        return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


class MatmulCatScan(nn.Module):
    """Channel-major (b, d, L) sequences, each step read out by matmul with C_t[..., None] and the
    (b, d, 1) results concatenated along time, unsqueezed by the matmul itself."""

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None):
        delta = F.softplus(delta + delta_bias[:, None])
        decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (b, d, L, n)
        update = delta.unsqueeze(-1) * B.permute(0, 2, 1).unsqueeze(1) * u.unsqueeze(-1)
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for t in range(u.shape[-1]):
            h = decay[:, :, t] * h + update[:, :, t]
            ys.append(h @ C[:, :, t].unsqueeze(-1))
        return torch.cat(ys, dim=-1) + u * D.view(-1, 1)


class PreallocatedOutputScan(nn.Module):
    """Each step's readout written into a preallocated output, out[:, :, t] = sum(h * C[:, None, :, t])."""

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None):
        delta = F.softplus(delta + delta_bias[:, None])
        decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (b, d, L, n)
        update = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
        h = torch.zeros(u.shape[0], A.shape[0], A.shape[1], dtype=u.dtype)
        out = torch.empty_like(u)
        for t in range(u.shape[-1]):
            h = decay[:, :, t] * h + update[:, :, t]
            out[:, :, t] = (h * C[:, None, :, t]).sum(-1)
        return (out + D[:, None] * u) * F.silu(z)


class StackedStatesScan(nn.Module):
    """mamba.py's selective_scan_seq: time-major (b, L, d) sequences, the states stacked, then read
    out with C all at once (matmul with C[..., None], einsum, or mul + sum over the state dim)."""

    def __init__(self, readout: str, stack_dim: int = 1):
        super().__init__()
        self.readout, self.stack_dim = readout, stack_dim

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None):
        x, delta = u.transpose(1, 2), F.softplus(delta + delta_bias[:, None]).transpose(1, 2)
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (b, L, n)
        decay = torch.exp(delta.unsqueeze(-1) * A)  # (b, L, d, n)
        bx = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
        h = torch.zeros(x.size(0), x.size(2), A.size(1))
        hs = []
        for t in range(x.shape[1]):
            h = decay[:, t] * h + bx[:, t]
            hs.append(h)
        hs = torch.stack(hs, dim=self.stack_dim)
        if self.stack_dim == 2:  # (b, d, L, n)
            y = torch.einsum("bdln,bln->bld", hs, C)
        elif self.readout == "matmul":
            y = (hs @ C.unsqueeze(-1)).squeeze(3)
        elif self.readout == "einsum":
            y = torch.einsum("bldn,bln->bld", hs, C)
        else:
            y = (hs * C.unsqueeze(2)).sum(dim=-1)
        return (y + D * x).transpose(1, 2)


def first_order_combine(a_left, b_left, a_right, b_right):
    return [a_left * a_right, a_right * b_left + b_right]


class PointwiseAssociativeScan(nn.Module):
    """Hugging Face's associative_scan path as TorchDynamo records it on CUDA (combine_mode="pointwise"):
    the higher-order op, called directly because torch takes pointwise mode only for CUDA tensors."""

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None):
        dt = F.softplus(delta + delta_bias[..., None])
        discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        deltaB_u = dt[:, :, :, None] * B.transpose(1, 2)[:, None, :, :] * u[:, :, :, None]
        xs = [torch.movedim(discrete_A, 2, 0), torch.movedim(deltaB_u, 2, 0)]
        states = torch.movedim(associative_scan_op(first_order_combine, xs, ())[1], 0, 2)
        y = torch.matmul(states.transpose(1, 2), C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return (y + u * D[None, :, None]) * F.silu(z)


SCAN_CASES = [
    Case(seqlen=1, dstate=16, dim=37),
    Case(seqlen=7, dstate=1, D=False, z=False, bias=False),
    Case(seqlen=7, dstate=4, dim=37, batch=2, groups=1, dtype=fp16),
    Case(seqlen=7, dstate=16, groups=2, z=False, dtype=bf16),
    Case(seqlen=128, dstate=4, groups=2, dtype=bf16),
    Case(seqlen=256, dstate=1, dim=37, D=False),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=str)
def test_reference_loop_fuses(case):
    assert_compiles_equivalent(ReferenceScan(), scan_inputs(case), case.dtype, "ssm_scan")


@pytest.mark.parametrize("case", [Case(seqlen=7, dim=37, dstate=16), Case(seqlen=128, dstate=1, z=False, dtype=fp16)],
                         ids=str)
def test_hugging_face_loop_fuses(case):
    compiled = assert_compiles_equivalent(HuggingFaceScan(), scan_inputs(case), case.dtype, "ssm_scan", rolled=False)
    assert "unrolled loop" in compiled.report()


@pytest.mark.parametrize("case", [Case(seqlen=7, dstate=16, dim=37), Case(seqlen=128, dstate=1, dtype=bf16)], ids=str)
def test_associative_scan_fuses(case):
    compiled = assert_compiles_equivalent(HuggingFaceScan(associative=True), scan_inputs(case), case.dtype, "ssm_scan",
                                          rolled=False)
    assert "associative_scan (decomposed)" in compiled.report()


def test_associative_scan_higher_order_op_fuses():
    compiled = assert_compiles_equivalent(PointwiseAssociativeScan(), scan_inputs(Case(seqlen=9, dim=37)), fp32,
                                          "ssm_scan")
    assert "associative_scan (pointwise)" in compiled.report()


@pytest.mark.parametrize("dtype", [fp32, bf16])
def test_sum_cat_spelling_fuses(dtype):
    assert_compiles_equivalent(SumCatScan(), scan_inputs(Case(seqlen=7, dim=4, groups=2, dtype=dtype)), dtype,
                               "ssm_scan")


@pytest.mark.parametrize("dtype", [fp32, fp16])
def test_matmul_readouts_concatenated_fuse(dtype):
    case = Case(seqlen=9, dim=37, dstate=4, batch=2, z=False, dtype=dtype)
    assert_compiles_equivalent(MatmulCatScan(), scan_inputs(case), dtype, "ssm_scan")


@pytest.mark.parametrize("dtype", [fp32, bf16])
def test_preallocated_output_fuses(dtype):
    case = Case(seqlen=9, dim=37, dstate=4, batch=2, dtype=dtype)
    assert_compiles_equivalent(PreallocatedOutputScan(), scan_inputs(case), dtype, "ssm_scan")


@pytest.mark.parametrize("readout,stack_dim", [("matmul", 1), ("einsum", 1), ("sum", 1), ("einsum", 2)])
def test_stacked_states_then_readout_fuses(readout, stack_dim):
    case = Case(seqlen=9, dim=37, dstate=4, batch=2, z=False)
    compiled = assert_compiles_equivalent(StackedStatesScan(readout, stack_dim), scan_inputs(case), fp32, "ssm_scan")
    assert "stacked states" in compiled.report()


def test_final_state_is_returned():
    u, delta, A, B, C, D, z, bias = scan_inputs(Case(seqlen=7, dim=37, batch=2))
    compiled = compiler.compile(ReferenceScan(last_state=True), strict=True)
    with torch.no_grad():
        out, state = compiled(u, delta, A, B, C, D, z, bias)
        expected_out, expected_state = ReferenceScan(last_state=True)(u, delta, A, B, C, D, z, bias)
    assert compiled.patterns == ["ssm_scan"], compiled.report()
    assert state.dtype == expected_state.dtype and state.shape == expected_state.shape
    torch.testing.assert_close(out, expected_out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(state, expected_state, rtol=6e-4, atol=2e-3)


def test_rolled_function_skips_unrolling():
    rolled = compiler.register_rolled(functools.wraps(selective_scan_ref)(
        lambda *args, **kwargs: selective_scan_ref(*args, **kwargs)))

    class Rolled(nn.Module):
        def forward(self, u, delta, A, B, C, D, z, delta_bias):
            return rolled(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    compiled = assert_compiles_equivalent(Rolled(), scan_inputs(Case(seqlen=1000, dstate=1, groups=2)), fp32,
                                          "ssm_scan")
    assert "rolled selective_scan_ref, L=1000" in compiled.report()


def test_float64_runs_the_pytorch_reference():
    args = scan_inputs(Case(seqlen=7, groups=2))
    compiled = compiler.compile(ReferenceScan().double(), strict=True)
    with torch.no_grad():
        ours = compiled(*[a.double() for a in args])
        expected = ReferenceScan()(*[a.double() for a in args])
    assert compiled.patterns == ["ssm_scan"]
    assert "ran in PyTorch 1x: u has dtype torch.float64" in compiled.report()
    torch.testing.assert_close(ours, expected)


# -- near-misses -----------------------------------------------------------------------------
class CarriedState(nn.Module):
    def forward(self, deltaA, deltaB_u, C, h):
        ys = []
        for t in range(deltaA.shape[2]):
            h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
        return torch.stack(ys, dim=2)


class PlainScan(nn.Module):
    """The bare recurrence; with `skip`, step 2 reads C at time 3 (not a scan)."""

    def __init__(self, skip: bool = False):
        super().__init__()
        self.skip = skip

    def forward(self, u, delta, A, B, C):
        deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for t in range(u.shape[2]):
            h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, 3 if self.skip and t == 2 else t]))
        return torch.stack(ys, dim=2)


def _near_misses(module, *args) -> str:
    compiled = compiler.compile(module)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), module(*args))
    assert "ssm_scan" not in compiled.patterns
    return compiled.report()


def test_carried_initial_state_is_a_near_miss():
    deltaA, deltaB_u, C, h = torch.rand(1, 4, 5, 2), torch.randn(1, 4, 5, 2), torch.randn(1, 2, 5), torch.randn(1, 4, 2)
    assert "initial state is not zeros" in _near_misses(CarriedState(), deltaA, deltaB_u, C, h)


def test_step_of_another_shape_is_a_near_miss():
    u, delta, A, B, C, *_ = scan_inputs(Case(seqlen=5, D=False, z=False, bias=False))
    assert "step 2: C is not read at time 2" in _near_misses(PlainScan(skip=True), u, delta.abs(), A, B, C)


def test_complex_A_is_a_near_miss():
    u, delta, A, B, C, *_ = scan_inputs(Case(seqlen=3, D=False, z=False, bias=False))
    A = torch.complex(A, torch.randn_like(A))
    report = _near_misses(PlainScan(), u.to(A.dtype), delta.abs().to(A.dtype), A, B.to(A.dtype), C.to(A.dtype))
    assert "complex64: the scan kernels are real-only" in report


# -- decode ----------------------------------------------------------------------------------
class StateUpdate(nn.Module):
    """models.mamba.selective_state_update_ref: one step, state updated in place."""

    def forward(self, state, x, dt, A, B, C, D, z, dt_bias):
        out = selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        return out, state


@pytest.mark.parametrize("dtype,mode", [(fp32, "default"), (bf16, "default"), (fp32, "max-autotune")])
@pytest.mark.parametrize("groups", [0, 2])
def test_decode_step_fuses(dtype, mode, groups):
    """max-autotune runs the in-place state update once per candidate: the result must not drift."""
    u, delta, A, B, C, D, z, bias = scan_inputs(Case(seqlen=1, dstate=16, dim=4, batch=2, groups=groups))
    state = torch.randn(2, 4, 16)
    args = [state, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias]
    ours_args = [a.to(dtype) for a in args]
    compiled = compiler.compile(StateUpdate(), mode=mode, strict=True)
    with torch.no_grad():
        ours, ours_state = compiled(*[a.clone() for a in ours_args])
        baseline, baseline_state = StateUpdate()(*[a.clone() for a in ours_args])
        reference, reference_state = StateUpdate()(*[a.double() for a in args])
    assert compiled.patterns == ["ssm_scan"], compiled.report()
    assert "decode step" in compiled.report()
    assert_close_by_rule(ours, baseline, reference)
    assert_close_by_rule(ours_state, baseline_state, reference_state)


# -- whole models ---------------------------------------------------------------------------
def test_mamba_lm_fuses_one_scan_per_layer():
    torch.manual_seed(0)
    config = MambaConfig.tiny()
    ids = torch.randint(0, config.vocab_size, (1, 12))
    assert_compiles_equivalent(MambaLM(config), (ids,), fp32, "ssm_scan", count=config.n_layer)


def hugging_face_mamba(associative: bool, layers: int = 2, falcon: bool = False):
    """Hugging Face's Mamba, or FalconMamba (B, C and Δ RMS-normalised before the scan)."""
    torch.manual_seed(0)
    config_type, model_type = ((transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM) if falcon
                               else (transformers.MambaConfig, transformers.MambaForCausalLM))
    config = config_type(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=layers,
                         use_associative_scan=associative)
    return model_type(config).eval()


@pytest.mark.parametrize("falcon", [False, True], ids=["mamba", "falcon_mamba"])
@pytest.mark.parametrize("associative", [False, True], ids=["loop", "associative_scan"])
def test_hugging_face_mamba_fuses_one_scan_per_layer(associative, falcon):
    model = hugging_face_mamba(associative, falcon=falcon)
    ids = torch.randint(0, 64, (1, 9))
    compiled = compiler.compile(model, strict=True, rolled=False)
    with torch.no_grad():
        ours = compiled(ids)
        baseline = model(ids)
        reference = copy.deepcopy(model).double()(ids)
    assert compiled.patterns.count("ssm_scan") == 2, compiled.report()
    assert ("associative_scan" if associative else "unrolled loop") in compiled.report()
    assert_close_by_rule(ours.logits, baseline.logits, reference.logits)
    for layer in range(2):
        assert_close_by_rule(ours.cache_params.get_recurrent_state(layer), baseline.cache_params.get_recurrent_state(layer),
                             reference.cache_params.get_recurrent_state(layer))


def test_hugging_face_decode_fuses_one_step_per_layer():
    model = hugging_face_mamba(associative=False)
    with torch.no_grad():
        cache = model(torch.randint(0, 64, (2, 6)), use_cache=True).cache_params
        reference_model = copy.deepcopy(model).double()
        reference_cache = reference_model(torch.randint(0, 64, (2, 6)), use_cache=True).cache_params
        for layer in range(2):
            reference_cache.get_recurrent_state(layer).copy_(cache.get_recurrent_state(layer))
            reference_cache.get_conv_state(layer).copy_(cache.get_conv_state(layer))
        baseline_cache = copy.deepcopy(cache)
        token = torch.randint(0, 64, (2, 1))
        compiled = compiler.compile(model, strict=True)
        ours = compiled(token, cache_params=cache, use_cache=True)
        baseline = model(token, cache_params=baseline_cache, use_cache=True)
        reference = reference_model(token, cache_params=reference_cache, use_cache=True)
    assert compiled.patterns.count("ssm_scan") == 2 and "decode step" in compiled.report(), compiled.report()
    assert_close_by_rule(ours.logits, baseline.logits, reference.logits)
    for layer in range(2):
        assert_close_by_rule(cache.get_recurrent_state(layer), baseline_cache.get_recurrent_state(layer),
                             reference_cache.get_recurrent_state(layer))


@pytest.mark.gpu
def test_scan_at_mamba_size_on_gpu():
    case = Case(seqlen=2048, dstate=16, dim=1536, batch=8, groups=0, dtype=bf16)
    args = [None if a is None else a.cuda() for a in scan_inputs(case)]
    assert_compiles_equivalent(ReferenceScan().cuda(), args, bf16, "ssm_scan")

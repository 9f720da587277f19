"""The sparse-MLP pass recognises DejaVu's MLP in its gathered and masked forms, and its kernels match eager.

Every equivalence test asserts that the pass fired (sparse_mlp ops in the compiled graph) and that
the compiled output is within the tolerance rule of fp64 eager. The cases cover densities
{1 neuron, 5%, 10%, 50%, 100%}, batches {1, 3, 16}, ReLU / GELU / GELU-tanh, with and without
biases, fp32 / fp16 / bf16, at odd widths: a grid that covers each value several times rather
than their full product. Spellings, the DejaVu LM, a model made sparse by compiler.sparsify,
run-time fallbacks of the masked form and near-misses follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from compiler import sparsify
from models.dejavu import DejaVuConfig, example
from models.gpt import GPT, GPTConfig
from runtime.bound import FastCall
from tests.compiler.equivalence import assert_compiles_equivalent

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}

# The interpreter warns about loop bounds held in 1-element arrays.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


class GatheredMLP(nn.Module):
    """DejaVu's gathered form: act(F.linear(x, W1[idx], b1[idx])), then F.linear(h, W2[:, idx], b2)."""

    def __init__(self, d: int, ffn: int, activation: str = "relu", bias: bool = True, device=None):
        super().__init__()
        self.fc1 = nn.Linear(d, ffn, bias=bias, device=device)
        self.fc2 = nn.Linear(ffn, d, bias=bias, device=device)
        self.act = ACTIVATION_MODULES[activation]()

    def forward(self, x, idx):
        b1 = None if self.fc1.bias is None else self.fc1.bias[idx]
        h = self.act(F.linear(x, self.fc1.weight[idx], b1))
        return F.linear(h, self.fc2.weight[:, idx], self.fc2.bias)


class MaskedMLP(GatheredMLP):
    """The masked form: fc2(act(fc1(x)) * mask)."""

    def forward(self, x, mask):
        return self.fc2(self.act(self.fc1(x)) * mask)


@dataclass(frozen=True)
class Case:
    """One MLP call: `batch` rows (a tuple for leading dims), width d, ffn neurons, density ("one": 1 neuron)."""

    batch: int | tuple
    d: int
    ffn: int
    density: float | str
    activation: str
    bias: bool
    dtype: torch.dtype

    @property
    def k(self) -> int:
        return 1 if self.density == "one" else max(1, round(self.density * self.ffn))

    def x(self, generator) -> torch.Tensor:
        rows = self.batch if isinstance(self.batch, tuple) else (self.batch,)
        return torch.randn(*rows, self.d, generator=generator)

    def idx(self, generator) -> torch.Tensor:
        return torch.randperm(self.ffn, generator=generator)[:self.k]


def case_id(case: Case) -> str:
    return (f"b{case.batch}-d{case.d}-f{case.ffn}-{case.density}-{case.activation}-"
            f"{'bias' if case.bias else 'nobias'}-{str(case.dtype)[6:]}")


def build(module_type, case: Case, seed: int) -> tuple[nn.Module, torch.Generator]:
    torch.manual_seed(seed)
    return module_type(case.d, case.ffn, case.activation, case.bias), torch.Generator().manual_seed(seed)


def assert_kernels_ran(compiled) -> None:
    """Every sparse_mlp op launched its kernels: none ran in PyTorch."""
    report = compiled.report()
    assert not [line for line in report.splitlines() if line.lstrip().startswith("sparse_mlp op")], report
    assert "sparse_mlp" in [kernel.pattern for kernel in compiled.kernels]


GATHERED_CASES = [
    Case(1, 75, 203, "one", "relu", True, fp16),
    Case(1, 97, 131, 0.05, "gelu", False, bf16),
    Case(1, 33, 301, 0.1, "gelu_tanh", True, fp32),
    Case(1, 75, 203, 0.5, "relu", False, fp32),
    Case(1, 97, 131, 1.0, "gelu", True, fp16),
    Case(3, 33, 301, "one", "gelu_tanh", False, bf16),
    Case(3, 75, 203, 0.05, "relu", True, fp32),
    Case(3, 97, 131, 0.1, "gelu", True, fp16),
    Case(3, 33, 301, 1.0, "relu", True, bf16),
    Case(16, 97, 131, "one", "gelu", True, fp32),
    Case((2, 8), 75, 203, 0.1, "relu", False, fp16),
    Case(16, 33, 301, 0.5, "gelu_tanh", True, bf16),
    Case(16, 75, 203, 1.0, "gelu_tanh", False, fp32),
]


@pytest.mark.parametrize("case", GATHERED_CASES, ids=case_id)
def test_gathered_form(case):
    module, generator = build(GatheredMLP, case, seed=GATHERED_CASES.index(case))
    compiled = assert_compiles_equivalent(module, (case.x(generator), case.idx(generator)), case.dtype, "sparse_mlp")
    assert_kernels_ran(compiled)


MASKED_CASES = [
    Case(1, 75, 203, "one", "gelu", True, bf16),
    Case(1, 97, 131, 0.1, "relu", False, fp16),
    Case(3, 33, 301, 0.05, "relu", True, fp32),
    Case(3, 75, 203, 0.5, "gelu_tanh", True, fp16),
    Case(16, 97, 131, 0.1, "gelu_tanh", False, bf16),
    Case((2, 8), 33, 301, 1.0, "gelu", False, fp32),
]


@pytest.mark.parametrize("case", MASKED_CASES, ids=case_id)
@pytest.mark.parametrize("mask_kind", ["float", "bool_rows"])
def test_masked_form(case, mask_kind):
    """A float (F,) mask, or a bool mask with one (identical) row per token."""
    module, generator = build(MaskedMLP, case, seed=MASKED_CASES.index(case))
    x = case.x(generator)
    keep = torch.zeros(case.ffn, dtype=torch.bool).index_fill(0, case.idx(generator), True)
    mask = keep.float() if mask_kind == "float" else keep.expand(*x.shape[:-1], case.ffn).clone()
    compiled = assert_compiles_equivalent(module, (x, mask), case.dtype, "sparse_mlp")
    assert_kernels_ran(compiled)


# -- spellings ----------------------------------------------------------------------------------
class IndexSelectMatmul(nn.Module):
    """x @ W1.index_select(0, idx).T + b1[idx] -> torch.relu -> h @ torch.index_select(W2, 1, idx).t() + b2."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, idx):
        h = torch.relu(x @ self.fc1.weight.index_select(0, idx).T + torch.index_select(self.fc1.bias, 0, idx))
        return h @ torch.index_select(self.fc2.weight, 1, idx).t() + self.fc2.bias


class TransposedStorage(nn.Module):
    """Weights stored as W1^T (D, F) and W2^T (F, D): x @ w1t[:, idx] -> F.gelu(tanh) -> h @ w2t[idx], no bias."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.w1t = nn.Parameter(torch.randn(d, ffn) / d ** 0.5)
        self.w2t = nn.Parameter(torch.randn(ffn, d) / ffn ** 0.5)

    def forward(self, x, idx):
        return F.gelu(x @ self.w1t[:, idx], approximate="tanh") @ self.w2t[idx]


class EllipsisGather(nn.Module):
    """b1.index_select, W2[..., idx], x.relu() and a residual add that is not W2's bias."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, idx):
        h = F.linear(x, self.fc1.weight[idx], self.fc1.bias.index_select(0, idx)).relu()
        return x + F.linear(h, self.fc2.weight[..., idx], self.fc2.bias)


class AddmmConv1D(nn.Module):
    """GPT-2's Conv1D spelling: weights stored (in, out), torch.addmm(b1[idx], x2d, w1[:, idx]) -> relu ->
    torch.addmm(b2, h, w2[idx])."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d, ffn) / d ** 0.5), nn.Parameter(torch.randn(ffn))
        self.w2, self.b2 = nn.Parameter(torch.randn(ffn, d) / ffn ** 0.5), nn.Parameter(torch.randn(d))

    def forward(self, x, idx):
        rows = x.reshape(-1, x.shape[-1])
        h = torch.relu(torch.addmm(self.b1[idx], rows, self.w1[:, idx]))
        return torch.addmm(self.b2, h, self.w2[idx]).view(x.shape)


class MaskFirst(nn.Module):
    """mask * F.gelu(x @ W1^T + b1) @ W2^T: the mask on the left, matmul projections."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d, bias=False)

    def forward(self, x, mask):
        return (mask * F.gelu(x @ self.fc1.weight.T + self.fc1.bias)) @ self.fc2.weight.mT


class InplaceReluMasked(MaskFirst):
    """mask * relu_(x @ W1^T + b1) @ W2^T with the ReLU in place (nn.ReLU(inplace=True), x.relu_()):
    no other reader sees the projection's old value, so it is the functional ReLU."""

    def forward(self, x, mask):
        return (mask * (x @ self.fc1.weight.T + self.fc1.bias).relu_()) @ self.fc2.weight.mT


class SelectKept(nn.Module):
    """A bool mask selecting neurons: torch.where(keep, h, 0) or h.masked_fill(~keep, 0.0)."""

    def __init__(self, d: int, ffn: int, spelling: str = "where"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.spelling = spelling

    def forward(self, x, keep):
        h = F.gelu(self.fc1(x))
        h = torch.where(keep, h, 0.0) if self.spelling == "where" else h.masked_fill(~keep, 0.0)
        return self.fc2(h)


@pytest.mark.parametrize("spelling", ["where", "masked_fill"])
@pytest.mark.parametrize("batch", [1, 16])
def test_bool_selection_masks(spelling, batch):
    torch.manual_seed(batch)
    d, ffn = 59, 173
    keep = torch.zeros(ffn, dtype=torch.bool).index_fill(0, torch.randperm(ffn)[:17], True)
    compiled = assert_compiles_equivalent(SelectKept(d, ffn, spelling), (torch.randn(batch, d), keep), fp32,
                                          "sparse_mlp")
    assert_kernels_ran(compiled)
    assert "selected where mask is True" in compiled.report() or "selected where mask is False" in compiled.report()


@pytest.mark.parametrize("module_type", [IndexSelectMatmul, TransposedStorage, EllipsisGather, AddmmConv1D, MaskFirst,
                                         InplaceReluMasked], ids=lambda t: t.__name__)
@pytest.mark.parametrize("batch", [1, 16])
def test_spellings(module_type, batch):
    torch.manual_seed(batch)
    d, ffn = 59, 173
    idx = torch.randperm(ffn)[:17]
    selector = torch.zeros(ffn).index_fill(0, idx, 1.0) if issubclass(module_type, MaskFirst) else idx
    x = torch.randn(batch, d) if batch > 1 else torch.randn(d)
    compiled = assert_compiles_equivalent(module_type(d, ffn), (x, selector), fp32, "sparse_mlp")
    assert_kernels_ran(compiled)


class ThresholdMask(nn.Module):
    """fc2(relu(fc1(x)) * (scores > 0)): a predictor's threshold mask, shared by the rows of a call."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.predictor = nn.Sequential(nn.Linear(d, 8, bias=False), nn.Linear(8, ffn))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) * (self.predictor(x).sum(0) > 1.0))


@pytest.mark.parametrize("dtype", [fp32, bf16], ids=str)
def test_threshold_mask_from_a_predictor(dtype):
    torch.manual_seed(0)
    compiled = assert_compiles_equivalent(ThresholdMask(59, 173), (torch.randn(5, 59),), dtype, "sparse_mlp")
    assert_kernels_ran(compiled)


def test_report_describes_the_fused_op():
    compiled = assert_compiles_equivalent(TransposedStorage(33, 65), (torch.randn(3, 33), torch.arange(0, 65, 7)),
                                          fp32, "sparse_mlp")
    assert "sparse_mlp_0 (gathered, bias none, gelu_tanh)" in compiled.report()
    (kernel,) = compiled.kernels
    assert kernel.name == "sparse_mlp_gelu_tanh" and "@triton.jit" in kernel.source
    assert kernel.config["up"]["BLOCK_M"] == 4


# -- gated MLPs (PowerInfer, TurboSparse, ReLU-fied Llama) ---------------------------------------
# Written the way their sources write them: Hugging Face's LlamaMLP (gate_proj, up_proj, down_proj,
# act_fn = ACT2FN[hidden_act]), Meta's FeedForward (w1, w2, w3), a predictor's threshold or top-k.
def act_fn(name: str) -> nn.Module:
    """Hugging Face's ACT2FN[name], or torch's module when transformers is absent."""
    try:
        from transformers.activations import ACT2FN
    except ImportError:
        return {"relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU()}[name]
    return ACT2FN[name]


class LlamaMLP(nn.Module):
    """Hugging Face's LlamaMLP (ReLU-fied: hidden_act "relu"), config.mlp_bias optional."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "relu", mlp_bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias)
        self.act_fn = act_fn(hidden_act)


class PredictorMasked(LlamaMLP):
    """PowerInfer-style: the predictor's mask multiplies the gated product,
    down_proj(act_fn(gate_proj(x)) * up_proj(x) * mask)."""

    def forward(self, x, mask):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * mask)


class MaskOnTheGate(LlamaMLP):
    """The product written the other way round, the mask on the gate first: (mask * act(g)) * up."""

    def forward(self, hidden_states, mask):
        gate = mask * self.act_fn(self.gate_proj(hidden_states))
        return self.down_proj(self.up_proj(hidden_states) * gate)


class WhereSelected(LlamaMLP):
    """torch.where(mask, act(g) * up, 0) and the other spellings of a dropped neuron's zero."""

    def __init__(self, *args, zero=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.zero = zero

    def forward(self, x, keep):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(torch.where(keep, h, 0.0 if self.zero is None else self.zero(h)))


class SwishWrittenOut(LlamaMLP):
    """SiLU written out as older code writes Swish, g * torch.sigmoid(g), masked by a predictor."""

    def forward(self, x, mask):
        g = self.gate_proj(x)
        return self.down_proj(mask * (torch.sigmoid(g) * g) * self.up_proj(x))


class MaskedFillGate(LlamaMLP):
    """The dropped neurons zeroed on the gate alone, gate.masked_fill(~keep, 0) * up."""

    def forward(self, x, keep):
        gate = self.act_fn(self.gate_proj(x)).masked_fill(~keep, 0)
        return self.down_proj(gate * self.up_proj(x))


class FeedForward(nn.Module):
    """Meta's Llama FeedForward, w2(F.silu(w1(x)) * w3(x)), with the neurons gathered by idx as
    DejaVu-for-Llama code writes it: x @ w1.weight[idx].T, torch.index_select, w2.weight[:, idx]."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x, idx):
        if self.w1.bias is None:
            gate = x @ self.w1.weight[idx].T
            up = x @ torch.index_select(self.w3.weight, 0, idx).t()
        else:
            gate = F.linear(x, self.w1.weight[idx], self.w1.bias[idx])
            up = F.linear(x, self.w3.weight.index_select(0, idx), self.w3.bias[idx])
        return F.linear(F.silu(gate) * up, self.w2.weight[:, idx], self.w2.bias)


class DownStoredTransposed(LlamaMLP):
    """The down weight kept transposed (F, D) for contiguous neuron rows, gathered as rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down_t = nn.Parameter(self.down_proj.weight.detach().t().contiguous())

    def forward(self, x, idx):
        up = F.linear(x, self.up_proj.weight[idx])
        return (up * self.act_fn(F.linear(x, self.gate_proj.weight[idx]))) @ self.down_t[idx]


class DReLU(LlamaMLP):
    """TurboSparse's dReLU, relu(gate(x)) * relu(up(x)), with a predictor's bool mask."""

    def forward(self, x, keep):
        combined = F.relu(self.gate_proj(x)) * F.relu(self.up_proj(x))
        return self.down_proj(combined * keep)


class InPlaceProduct(LlamaMLP):
    """h = act(gate(x)); h *= up(x); h *= mask: the product written in place."""

    def forward(self, x, mask):
        h = self.act_fn(self.gate_proj(x))
        h *= self.up_proj(x)
        h *= mask
        return self.down_proj(h)


class Phi3MLP(nn.Module):
    """Phi-3's MLP: one merged gate_up_proj, chunked, up_states * activation_fn(gate), then a mask."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation_fn = act_fn(hidden_act)

    def forward(self, hidden_states, mask):
        up_states = self.gate_up_proj(hidden_states)
        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)
        return self.down_proj(up_states * mask)


class MergedSliced(Phi3MLP):
    """The merged projection sliced, gate_up[..., :F] and torch.split's second part, and a where."""

    def forward(self, x, keep):
        gate_up = self.gate_up_proj(x)
        ffn = self.down_proj.in_features
        up = torch.split(gate_up, [ffn, ffn], dim=-1)[1]
        return self.down_proj(torch.where(keep, self.activation_fn(gate_up[..., :ffn]) * up, 0))


def gated_inputs(batch, d, ffn, selector: str, generator):
    """(x, selector): idx (K,) sorted, a float 0/1 mask (F,), or bool keep rows (batch, F)."""
    x = torch.randn(batch, d, generator=generator)
    idx = torch.randperm(ffn, generator=generator)[:max(1, ffn // 7)].sort().values
    keep = torch.zeros(ffn, dtype=torch.bool).index_fill(0, idx, True)
    return x, {"idx": idx, "float": keep.float(), "bool": keep.expand(batch, ffn).clone()}[selector]


def gated_case(selector: str):
    """(module, [x, selector]) of a small gated MLP: Meta's FeedForward gathered by idx, or Llama's
    MLP with SiLU and biases masked by bool rows (tests/runtime/test_custom_ops.py)."""
    torch.manual_seed(0)
    module = FeedForward(16, 48, bias=True) if selector == "idx" else PredictorMasked(16, 48, "silu", True)
    return module.eval(), list(gated_inputs(3, 16, 48, selector, torch.Generator().manual_seed(0)))


GATED_SPELLINGS = [  # (module, selector, activation, bias)
    (PredictorMasked, "float", "relu", False),
    (PredictorMasked, "bool", "silu", True),
    (MaskOnTheGate, "float", "gelu", False),
    (WhereSelected, "bool", "relu", True),
    (MaskedFillGate, "bool", "silu", False),
    (DownStoredTransposed, "idx", "relu", False),
    (DReLU, "bool", "relu", True),
    (InPlaceProduct, "float", "silu", False),
    (SwishWrittenOut, "float", "silu", False),
    (Phi3MLP, "float", "silu", False),
    (MergedSliced, "bool", "gelu", True),
]


@pytest.mark.parametrize("module_type, selector, activation, bias", GATED_SPELLINGS,
                         ids=[f"{t.__name__}-{a}" for t, _, a, _ in GATED_SPELLINGS])
@pytest.mark.parametrize("batch, dtype", [(1, bf16), (5, fp32)], ids=["decode-bf16", "batch5-fp32"])
def test_gated_spellings(module_type, selector, activation, bias, batch, dtype):
    torch.manual_seed(0)
    d, ffn = 59, 173
    x, chosen = gated_inputs(batch, d, ffn, selector, torch.Generator().manual_seed(batch))
    module = module_type(d, ffn, activation, bias)
    compiled = assert_compiles_equivalent(module, (x, chosen), dtype, "sparse_mlp")
    assert_kernels_ran(compiled)
    assert "gated" in compiled.report()
    assert compiled.kernels[0].name.startswith(f"sparse_mlp_gated_{activation}")


@pytest.mark.parametrize("bias, batch, dtype", [(False, 1, fp16), (True, 4, bf16), (True, (2, 3), fp32)])
def test_meta_feed_forward_gathered(bias, batch, dtype):
    torch.manual_seed(0)
    rows = batch if isinstance(batch, tuple) else (batch,)
    x, idx = torch.randn(*rows, 75), torch.randperm(203)[:29]
    compiled = assert_compiles_equivalent(FeedForward(75, 203, bias), (x, idx), dtype, "sparse_mlp")
    assert_kernels_ran(compiled)
    assert f"gated gathered, bias {'b1+b3+b2' if bias else 'none'}, silu" in compiled.report()


def test_dropped_inf_is_nan_as_in_eager():
    """where(keep, h, 0 * h) and a mask on the gate alone drop a neuron by a product with 0: eager's
    NaN where the input holds inf, so such calls run in PyTorch."""
    x, keep = gated_inputs(1, 16, 48, "bool", torch.Generator().manual_seed(0))
    x[0, 3] = float("inf")
    for module in (WhereSelected(16, 48, zero=lambda h: 0 * h), MaskedFillGate(16, 48)):
        compiled = compiler.compile(module.eval(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, keep), module(x, keep), equal_nan=True)
        assert "non-finite inputs" in compiled.report()


class PowerInferBlock(nn.Module):
    """A ReLU-fied Llama MLP whose neurons a low-rank predictor picks (PowerInfer: sigmoid > 0.5)."""

    def __init__(self, d: int, ffn: int, rank: int = 8):
        super().__init__()
        self.mlp = LlamaMLP(d, ffn, "relu")
        self.predictor = nn.Sequential(nn.Linear(d, rank, bias=False), nn.ReLU(), nn.Linear(rank, ffn, bias=False))

    def forward(self, x):
        mlp = self.mlp
        mask = torch.sigmoid(self.predictor(x)) > 0.5
        return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * mask)


class ActiveGate(LlamaMLP):
    """The neurons a ReLU gate leaves active, act(gate(x)) > 0 (CATS with threshold 0): the gate stays
    dense in PyTorch for the mask, the kernels recompute the active neurons' gate and up rows."""

    def forward(self, x):
        gate = self.act_fn(self.gate_proj(x))
        return self.down_proj(torch.where(gate > 0, gate * self.up_proj(x), 0.0))


class TopKCombined(LlamaMLP):
    """TurboSparse's evaluation: the top-k neurons of |relu(gate) * relu(up)| per token."""

    def forward(self, x):
        combined = F.relu(self.gate_proj(x)) * F.relu(self.up_proj(x))
        idx = combined.abs().topk(7, dim=-1).indices
        mask = torch.zeros_like(combined).scatter(-1, idx, 1.0)
        return self.down_proj(combined * mask)


class CatsMLP(LlamaMLP):
    """CATS (Lee et al. 2024): activations below a threshold zeroed in place, post_act[mask] = 0.0."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__(hidden_size, intermediate_size, "silu")
        self.thresh = 0.1

    def forward(self, x):
        post_act = self.act_fn(self.gate_proj(x))
        mask = post_act.abs() < self.thresh
        post_act[mask] = 0.0
        return self.down_proj(post_act * self.up_proj(x))


@pytest.mark.parametrize("module_type", [PowerInferBlock, ActiveGate, TopKCombined, CatsMLP],
                         ids=lambda t: t.__name__)
def test_masks_from_a_predictor_or_the_gate_itself(module_type):
    """One decode token: the mask is shared by the call's rows, so the kernels run."""
    torch.manual_seed(0)
    compiled = assert_compiles_equivalent(module_type(32, 96), (torch.randn(1, 1, 32),), fp32, "sparse_mlp")
    assert_kernels_ran(compiled)


@pytest.mark.parametrize("module_type", [PowerInferBlock, ActiveGate, TopKCombined, CatsMLP],
                         ids=lambda t: t.__name__)
def test_masks_per_token_in_a_batch(module_type):
    """Each of the 5 tokens keeps its own neurons: the kernels run over their union, each row masked."""
    torch.manual_seed(0)
    compiled = assert_compiles_equivalent(module_type(32, 96), (torch.randn(5, 32),), bf16, "sparse_mlp")
    assert_kernels_ran(compiled)


def test_mask_from_the_gate_keeps_the_dense_gate_in_pytorch():
    torch.manual_seed(0)
    compiled = assert_compiles_equivalent(ActiveGate(32, 96), (torch.randn(3, 32),), fp32, "sparse_mlp")
    (fused,) = compiled._report.fused
    assert fused.replaced == ("linear_1", "mul", "where", "linear_2"), "gate_proj (linear) and relu stay"


# -- models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("form, dtype", [("gathered", fp32), ("masked", fp32), ("gathered", bf16)])
def test_dejavu_lm(form, dtype):
    """One sparse_mlp op per layer, next to one attention op per layer; the predictor stays in PyTorch."""
    model, args = example(DejaVuConfig.tiny(form=form, activation="gelu" if dtype == bf16 else "relu"), length=8)
    compiled = assert_compiles_equivalent(model, args, dtype, "sparse_mlp", count=2)
    assert compiled.patterns.count("attention") == 2
    assert_kernels_ran(compiled)


class Logits(nn.Module):
    """A Hugging Face causal LM called with token ids, returning its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def tiny_opt() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    return Logits(transformers.OPTForCausalLM(config))


def tiny_relu_llama() -> nn.Module:
    """Hugging Face's Llama with ReLU-fied gated MLPs (hidden_act "relu"), returning logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu",
                                      max_position_embeddings=128)
    return Logits(transformers.LlamaForCausalLM(config))


@pytest.mark.parametrize("factory, form, detail", [
    (lambda: GPT(GPTConfig.tiny()), "masked", "masked, bias b1+b2, gelu_tanh"),
    (tiny_opt, "gathered", "gathered, bias b1+b2, relu"),
    (tiny_relu_llama, "gathered", "gated gathered, bias none, relu"),
    (tiny_relu_llama, "masked", "gated masked, bias none, relu"),
], ids=["gpt-masked", "hf-opt-gathered", "relu-llama-gathered", "relu-llama-masked"])
def test_sparsified_model_compiles_to_its_own_sparse_forward(factory, form, detail):
    """compiler.sparsify installs the sparse forward in a dense model; compiled, it equals its uncompiled self."""
    torch.manual_seed(0)
    model = factory().eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (2, 16), generator=generator) for _ in range(3)]
    sparsify(model, batches, density=0.1, steps=2, progress=False, form=form)
    ids = torch.randint(0, 96, (1, 9), generator=generator)
    compiled = assert_compiles_equivalent(model, (ids,), fp32, "sparse_mlp", count=2)
    assert_kernels_ran(compiled)
    assert detail in compiled.report()


# -- the masked form at run time ----------------------------------------------------------------
ROW_MASKS = {  # masks each row applies on its own: the kernels run over the union of kept neurons
    "per_row": lambda g: (torch.rand(3, 65, generator=g) < 0.2).float(),
    "scaled": lambda g: torch.rand(65, generator=g) * (torch.rand(65, generator=g) < 0.2),
    "per_row_bool": lambda g: torch.rand(3, 65, generator=g) < 0.2,
}


@pytest.mark.parametrize("mask_kind", ROW_MASKS)
@pytest.mark.parametrize("module_type", [MaskedMLP, PredictorMasked], ids=lambda t: t.__name__)
def test_masks_that_differ_by_row_or_scale_run_the_kernels(mask_kind, module_type):
    case = Case(3, 33, 65, 0.2, "relu", True, fp32)
    module, generator = build(module_type, case, seed=4)
    mask = ROW_MASKS[mask_kind](generator)
    compiled = assert_compiles_equivalent(module, (case.x(generator), mask), case.dtype, "sparse_mlp")
    assert_kernels_ran(compiled)


def test_a_mask_that_keeps_no_neuron_runs_in_pytorch():
    case = Case(3, 33, 65, 0.2, "relu", True, fp32)
    module, generator = build(MaskedMLP, case, seed=4)
    compiled = assert_compiles_equivalent(module, (case.x(generator), torch.zeros(65, dtype=torch.bool)), case.dtype,
                                          "sparse_mlp")
    assert "keeps no neuron" in compiled.report()


def test_weight_updates_in_place_are_seen():
    """W2's column-major copy is kept between calls and rebuilt when W2 changes in place."""
    module = MaskedMLP(33, 65).eval()
    x, mask = torch.randn(2, 33), (torch.arange(65) % 3 == 0).float()
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        compiled(x, mask)
        (op,) = compiled._report.ops
        copy_before = op._w2_column_major[2]
        compiled(x, mask)
        assert op._w2_column_major[2] is copy_before
        module.fc2.weight.mul_(-2.0)
        torch.testing.assert_close(compiled(x, mask), module(x, mask))
    assert op._w2_column_major[2] is not copy_before


class TopkGathered(GatheredMLP):
    """idx from top-k over the F neurons, sorted: provably in range, so never checked at run time."""

    def forward(self, x, scores):
        return super().forward(x, scores.topk(7).indices.sort().values)


def test_weight_updates_in_place_are_seen_by_a_replayed_fast_path():
    """The gathered form's fast path, replayed as one call (runtime.bound), makes W2's column-major
    copy through a fresh call: an in-place update between replays is seen too."""
    module = TopkGathered(16, 40).eval()
    x, scores = torch.randn(3, 16), torch.randn(40)
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        for _ in range(3):  # plan, bind, replay
            compiled(x, scores)
        (op,) = compiled._report.ops
        assert not isinstance(op._latest_fast_path[2], FastCall) and op._w2_column_major is not None  # bound
        module.fc2.weight.mul_(-2.0)
        torch.testing.assert_close(compiled(x, scores), module(x, scores))


def test_index_range_is_proven_or_checked():
    module = GatheredMLP(16, 40).eval()
    x = torch.randn(3, 16)
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        compiled(x, torch.tensor([0, 5, 39]))
        (op,) = compiled._report.ops
        assert not op.layout.indices_proven
        for bad in (torch.tensor([0, 40]), torch.tensor([3, -41])):
            with pytest.raises(IndexError):
                module(x, bad)
            with pytest.raises(IndexError):
                compiled(x, bad)
    assert "indices outside [0, 40)" in compiled.report()
    torch._dynamo.reset()
    proven = compiler.compile(TopkGathered(16, 40).eval(), strict=True)
    with torch.no_grad():
        proven(x, torch.randn(40))
    assert proven._report.ops[0].layout.indices_proven


# -- near-misses --------------------------------------------------------------------------------
class TanhGathered(GatheredMLP):
    def __init__(self, d, ffn):
        super().__init__(d, ffn)
        self.act = nn.Tanh()


class MishMasked(MaskedMLP):
    def __init__(self, d, ffn):
        super().__init__(d, ffn)
        self.act = nn.Mish()


class InplaceReluObserved(MaskedMLP):
    """nn.ReLU(inplace=True) over a projection the model also returns: the ReLU overwrites it, so the
    output reads the ReLU's result (ir.mutation), which the fused op would keep private."""

    def __init__(self, d, ffn):
        super().__init__(d, ffn)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x, mask):
        projected = self.fc1(x)
        return self.fc2(self.act(projected) * mask), projected


class TrainingDropout(GatheredMLP):
    def forward(self, x, idx):
        h = F.dropout(torch.relu(F.linear(x, self.fc1.weight[idx], self.fc1.bias[idx])), p=0.3, training=True)
        return F.linear(h, self.fc2.weight[:, idx], self.fc2.bias)


class PerRowIndices(GatheredMLP):
    """Each row its own neurons, idx (M, K): batched gathers the shared-idx kernels cannot take."""

    def forward(self, x, idx):
        h = torch.relu(torch.bmm(x[:, None, :], self.fc1.weight[idx].transpose(1, 2)))
        return torch.bmm(h, self.fc2.weight.t()[idx])[:, 0]


class TwoIndices(GatheredMLP):
    def forward(self, x, idx):
        h = F.relu(F.linear(x, self.fc1.weight[idx], self.fc1.bias[idx]))
        return F.linear(h, self.fc2.weight[:, idx.flip(0)], self.fc2.bias)


class ReturnsActivations(MaskedMLP):
    def forward(self, x, mask):
        h = self.act(self.fc1(x))
        return self.fc2(h * mask), h


class GatedMasked(LlamaMLP):
    """Near-misses of the gated MLP, masked by a float mask (F,) (gathered: idx) unless said otherwise."""

    def __init__(self, d, ffn):
        super().__init__(d, ffn, "relu")


class TanhGate(GatedMasked):
    def forward(self, x, mask):
        return self.down_proj(torch.tanh(self.gate_proj(x)) * self.up_proj(x) * mask)


class UpReadsAnotherInput(GatedMasked):
    def forward(self, x, mask):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x.flip(0)) * mask)


class UpGatheredByAnotherIdx(GatedMasked):
    gathered = True

    def forward(self, x, idx):
        up = F.linear(x, self.up_proj.weight[idx.flip(0)])
        return F.linear(self.act_fn(F.linear(x, self.gate_proj.weight[idx])) * up, self.down_proj.weight[:, idx])


class ThreeProjections(GatedMasked):
    def forward(self, x, mask):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * self.gate_proj(x) * mask)


class TwoMasks(GatedMasked):
    def forward(self, x, mask):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * mask * self.up_proj(x) * (mask > 0))


class ReturnsTheGate(GatedMasked):
    def forward(self, x, mask):
        gate = self.act_fn(self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x) * mask), gate


class Bilinear(GatedMasked):
    def forward(self, x, mask):
        return self.down_proj(self.gate_proj(x) * self.up_proj(x) * mask)


class MaskPerRowAndToken(GatedMasked):
    """A mask (M, 1, F) that broadcasts the (M, F) activations to (M, M, F)."""

    def forward(self, x, mask):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * mask.expand(3, 48)[:, None])


class GatedTrainingDropout(GatedMasked):
    def forward(self, x, mask):
        gate = F.dropout(self.act_fn(self.gate_proj(x)), p=0.3, training=True)
        return self.down_proj(gate * self.up_proj(x) * mask)


def near_miss_args(module_type):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=generator)
    if module_type is PerRowIndices:
        return x, torch.stack([torch.randperm(48, generator=generator)[:5] for _ in range(3)])
    idx = torch.randperm(48, generator=generator)[:5]
    if issubclass(module_type, MaskedMLP) or (issubclass(module_type, GatedMasked)
                                              and not getattr(module_type, "gathered", False)):
        return x, torch.zeros(48).index_fill(0, idx, 1.0)
    return x, idx


@pytest.mark.parametrize("module_type, node, reason", [
    (TanhGathered, "h", "tanh is not an activation the kernel fuses (relu, gelu, gelu tanh, silu)"),
    (MishMasked, "mish", "mish is not an activation the kernel fuses"),
    (InplaceReluObserved, "relu", "also read by output"),
    (TrainingDropout, "h", "dropout is active (training mode) between the activation and the down projection"),
    (PerRowIndices, "getitem_2", "idx is 2-D: the kernels take one 1-D set of neurons"),
    (TwoIndices, "getitem", "W1 and W2 are not gathered by the same idx"),
    (ReturnsActivations, "h", "intermediate is also read by"),
    (TanhGate, "tanh", "tanh is not an activation the kernel fuses"),
    (UpReadsAnotherInput, "linear_1", "the gate and up projections read different inputs"),
    (UpGatheredByAnotherIdx, "getitem", "W3 and W2 are not gathered by the same idx"),
    (ThreeProjections, "mul_2", "3 projections multiply: a gated MLP has two"),
    (TwoMasks, "gt", "a second mask: the kernels take one selection of neurons"),
    (ReturnsTheGate, "gate", "intermediate is also read by output"),
    (Bilinear, "mul_1", "neither factor of the gated product is activated"),
    (MaskPerRowAndToken, "mul_1", "the mask broadcasts the activations to a larger shape"),
    (GatedTrainingDropout, "gate", "dropout is active (training mode) between the activation and the mask"),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_near_misses_are_reported_and_run_in_pytorch(module_type, node, reason):
    torch.manual_seed(0)
    module = module_type(16, 48).eval()
    args = near_miss_args(module_type)
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        torch.manual_seed(1)
        ours = compiled(*args)
        torch.manual_seed(1)
        eager = module(*args)
    torch.testing.assert_close(ours, eager)
    assert "sparse_mlp" not in compiled.patterns
    (line,) = [line for line in compiled.report().splitlines() if "sparse_mlp at" in line]
    assert f"node {node}: " in line and reason in line, compiled.report()


class SwiGLU(nn.Module):
    """A gated MLP, down(silu(gate(x)) * up(x)): no mask, so no sparse-MLP candidate."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, ffn), nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)) + self.down(F.relu(self.up(x)))


def test_dense_and_gated_mlps_are_no_candidates():
    module, x = SwiGLU(16, 48).eval(), torch.randn(2, 16)
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x))
    assert compiled.patterns == [] and "sparse_mlp" not in compiled.report()


def test_float64_is_a_near_miss():
    module = MaskedMLP(16, 48).double().eval()
    x, mask = near_miss_args(MaskedMLP)
    compiled = compiler.compile(module, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.double(), mask.double()), module(x.double(), mask.double()))
    assert "float64 is not supported by the kernels" in compiled.report()


# -- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("module_type", [GatheredMLP, MaskedMLP], ids=lambda t: t.__name__)
@pytest.mark.parametrize("batch", [1, 16])
def test_opt_6_7b_layer_bf16(module_type, batch):
    """One OPT-6.7B MLP (d 4096, ffn 16384, ReLU) at 10% density, compiled kernels on the GPU."""
    torch.manual_seed(0)
    module = module_type(4096, 16384, "relu", True, device="cuda")
    x = torch.randn(batch, 4096, device="cuda")
    idx = torch.randperm(16384, device="cuda")[:1638]
    selector = torch.zeros(16384, device="cuda").index_fill(0, idx, 1.0) if module_type is MaskedMLP else idx
    compiled = assert_compiles_equivalent(module, (x, selector), bf16, "sparse_mlp")
    assert_kernels_ran(compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_relu_llama_2_7b_mlp_bf16(batch):
    """ReLU-fied Llama-2-7B's MLP (d 4096, ffn 11008) with a predictor's bool mask at 10%, on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        module = PredictorMasked(4096, 11008, "relu")
        x = torch.randn(batch, 4096)
        keep = torch.zeros(11008, dtype=torch.bool).index_fill(0, torch.randperm(11008)[:1101], True)
    compiled = assert_compiles_equivalent(module, (x, keep), bf16, "sparse_mlp")
    assert_kernels_ran(compiled)


# -- zero spelled as a tensor ----------------------------------------------------------------------
class WhereZerosMLP(GatheredMLP):
    """fc2(where(keep, act(fc1(x)), zeros)) with the zeros spelled `zero(h)`, kept where True or False."""

    def __init__(self, zero, keep_when: bool = True):
        super().__init__(16, 48)
        self.zero, self.keep_when = zero, keep_when

    def forward(self, x, keep):
        h = self.act(self.fc1(x))
        return self.fc2(torch.where(keep, h, self.zero(h)) if self.keep_when else torch.where(keep, self.zero(h), h))


ZERO_SPELLINGS = {
    "zeros_like": torch.zeros_like,
    "new_zeros": lambda h: h.new_zeros(h.shape),
    "zeros_row": lambda h: torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device),
    "full_like": lambda h: torch.full_like(h, 0.0),
    "tensor": lambda h: torch.tensor(0.0),  # 0-d: does not promote h's dtype
}


@pytest.mark.parametrize("keep_when", [True, False])
@pytest.mark.parametrize("dtype", [fp32, bf16], ids=str)
@pytest.mark.parametrize("zero", ZERO_SPELLINGS.values(), ids=ZERO_SPELLINGS.keys())
def test_where_with_zeros_spelled_as_a_tensor_fuses(zero, dtype, keep_when):
    torch.manual_seed(0)
    keep = torch.zeros(48, dtype=torch.bool).index_fill(0, torch.randperm(48)[:9], True)
    keep = keep if keep_when else ~keep
    assert_compiles_equivalent(WhereZerosMLP(zero, keep_when), [torch.randn(3, 16), keep], dtype, "sparse_mlp")


def test_zeros_that_widen_the_dtype_are_left_as_they_are():
    """bf16 activations and fp32 zeros: eager's where computes in fp32, so no scalar zero replaces them."""
    module = WhereZerosMLP(lambda h: torch.zeros(h.shape[-1])).eval().to(bf16)
    x, keep = torch.randn(3, 16, dtype=bf16), torch.rand(48) > 0.5
    with pytest.raises(RuntimeError, match="dtype"):
        module(x, keep)  # eager itself: fc2 (bf16) cannot take the fp32 where
    compiled = compiler.compile(module)
    with pytest.raises(RuntimeError, match="dtype"):
        compiled(x, keep)


@pytest.mark.parametrize("zero", [*ZERO_SPELLINGS.values(), lambda h: 0 * h],
                         ids=[*ZERO_SPELLINGS.keys(), "zero_times"])
def test_gated_where_with_every_zero(zero):
    torch.manual_seed(0)
    x, keep = gated_inputs(1, 16, 48, "bool", torch.Generator().manual_seed(0))
    compiled = assert_compiles_equivalent(WhereSelected(16, 48, zero=zero), (x, keep), bf16, "sparse_mlp")
    assert_kernels_ran(compiled)

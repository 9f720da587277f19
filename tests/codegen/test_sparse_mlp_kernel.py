"""The DejaVu gather kernels (codegen/sparse_mlp.py, templates/sparse_mlp.py.jinja).

Every kernel case draws fresh random inputs, poisons `out` with NaN, launches the generated
module and holds it to the tolerance rule of tests/numerics.py: the reference is the masked
dense MLP fc2(act(fc1(x)) * mask) in fp64 (gated: down(act(gate(x)) * up_act(up(x)) * mask)),
the baseline the same math in the dtype under test. The cases cover densities {1 neuron, 5%,
10%, 50%, 100%}, batches {1, 3, 16, 17} (GEMV and tl.dot paths), ReLU / GELU / GELU-tanh / SiLU,
gated or not (with an identity or ReLU up activation, TurboSparse's dReLU), with and without
biases, at odd model and ffn widths; a grid that covers each value several times rather than
their full product.

Without CUDA the kernels run on Triton's interpreter on CPU tensors, so sizes stay small; with
CUDA the same cases run compiled, and the `gpu` tests add OPT-6.7B sizes (d 4096, ffn 16384).
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from codegen.sparse_mlp import (
    ACTIVATIONS,
    UP_ACTIVATIONS,
    SparseMLPSpec,
    column_major,
    config_space,
    default_config,
    gated_sparse_mlp_reference,
    kernel_name,
    render_sparse_mlp,
    sparse_mlp_reference,
    unsupported_reason,
)
from runtime.interpret import ensure_mode
from runtime.loader import load_source
from tests.numerics import assert_close_by_rule, poisoned_like

DEVICE = torch.device("cpu" if ensure_mode() else "cuda")
fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32

# The interpreter warns about loop bounds held in 1-element arrays.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@functools.lru_cache(maxsize=None)
def generated(activation: str, gated: bool = False, up_activation: str = "identity"):
    spec = SparseMLPSpec(activation, gated, up_activation)
    module, _ = load_source(kernel_name(spec), render_sparse_mlp(spec))
    return module


@dataclass(frozen=True)
class Case:
    """One launch: M rows, model width d, ffn width f, density ("one" = a single neuron); gated:
    up_activation None is the plain MLP, else the gated one's activation of its up projection."""

    m: int
    d: int
    f: int
    density: float | str
    activation: str = "relu"
    bias: bool = True
    dtype: torch.dtype = fp16
    up_activation: str | None = None

    @property
    def k(self) -> int:
        return 1 if self.density == "one" else max(1, round(self.density * self.f))

    @property
    def gated(self) -> bool:
        return self.up_activation is not None

    def launch(self, ops, out, config=None):
        options = {"up_activation": self.up_activation} if self.gated else {}
        module = generated(self.activation, self.gated, self.up_activation or "identity")
        return module.launch(*ops, out, activation=self.activation, config=config, **options)


def case_id(c: Case) -> str:
    gate = "" if not c.gated else f"gated-{c.up_activation}-"
    return (f"m{c.m}-d{c.d}-f{c.f}-{c.density}-{gate}{c.activation}-{'bias' if c.bias else 'nobias'}-"
            f"{str(c.dtype)[6:]}")


def operands(case: Case, seed: int, device=DEVICE):
    """fp64 (x, w1, b1, w2, b2, idx), gated (x, w1, b1, w3, b3, w2, b2, idx): drawn fresh from
    N(0, 1) at fan-in scale, and k unique indices."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.m, case.d, generator=g, dtype=torch.float64)
    w1 = torch.randn(case.f, case.d, generator=g, dtype=torch.float64) / case.d ** 0.5
    w2 = torch.randn(case.d, case.f, generator=g, dtype=torch.float64) / case.k ** 0.5
    b1 = torch.randn(case.f, generator=g, dtype=torch.float64) * 0.5 if case.bias else None
    b2 = torch.randn(case.d, generator=g, dtype=torch.float64) * 0.5 if case.bias else None
    idx = torch.randperm(case.f, generator=g)[:case.k].sort().values
    up = []
    if case.gated:
        up = [torch.randn(case.f, case.d, generator=g, dtype=torch.float64) / case.d ** 0.5,
              torch.randn(case.f, generator=g, dtype=torch.float64) * 0.5 if case.bias else None]
    return [None if t is None else t.to(device) for t in (x, w1, b1, *up, w2, b2, idx)]


def cast(tensors, dtype):
    return [t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors]


def masked_dense(*ops, activation, up_activation=None, row_mask=None):
    """The reference: the dense MLP with the unselected neurons zeroed, fc2(act(fc1(x)) * mask),
    or gated down(act(gate(x)) * up_act(up(x)) * mask); the mask is row_mask (M, F) when given."""
    x, w1, b1, *up, w2, b2, idx = ops
    mask = torch.zeros(w1.shape[0], dtype=x.dtype, device=x.device).index_fill(0, idx, 1.0)
    h = ACTIVATIONS[activation](F.linear(x, w1, b1))
    if up_activation is not None:
        h = h * UP_ACTIVATIONS[up_activation](F.linear(x, *up))
    return F.linear(h * (mask if row_mask is None else row_mask.to(x.dtype)), w2, b2)


def run_and_check(case: Case, seed: int, *, config=None, prepare=lambda ops: ops):
    reference_ops = operands(case, seed)
    ops = prepare(cast(reference_ops, case.dtype))
    x = ops[0]
    out = poisoned_like(torch.empty(case.m, case.d, dtype=case.dtype, device=x.device))
    case.launch(ops, out, config)
    math = {"activation": case.activation, "up_activation": case.up_activation}
    reference = masked_dense(*reference_ops, **math)
    baseline = masked_dense(*cast(reference_ops, case.dtype), **math)
    assert_close_by_rule(out, baseline, reference)
    return out


CASES = [
    Case(1, 75, 203, "one", "relu", True, fp16),
    Case(1, 75, 203, 0.05, "gelu", False, bf16),
    Case(1, 97, 131, 0.1, "gelu_tanh", True, fp32),
    Case(1, 33, 301, 0.5, "relu", False, fp32),
    Case(1, 75, 203, 1.0, "gelu", True, fp16),
    Case(3, 75, 203, "one", "gelu", True, bf16),
    Case(3, 97, 131, 0.05, "relu", True, fp32),
    Case(3, 33, 301, 0.1, "gelu", False, fp16),
    Case(3, 75, 203, 0.5, "gelu_tanh", False, bf16),
    Case(3, 97, 131, 1.0, "relu", True, bf16),
    Case(16, 75, 203, "one", "gelu_tanh", False, fp32),
    Case(16, 97, 131, 0.05, "relu", True, bf16),
    Case(16, 33, 301, 0.1, "relu", True, fp16),
    Case(16, 75, 203, 0.5, "gelu", True, fp32),
    Case(16, 97, 131, 1.0, "gelu_tanh", True, fp16),
    Case(16, 75, 203, 0.1, "gelu", False, bf16),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_masked_dense_mlp(case):
    run_and_check(case, seed=CASES.index(case))


GATED_CASES = [  # Llama's SwiGLU, ReLU-fied Llama (ReGLU), GeGLU, TurboSparse's dReLU
    Case(1, 75, 203, "one", "silu", False, bf16, "identity"),
    Case(1, 97, 131, 0.1, "relu", False, fp16, "identity"),
    Case(1, 33, 301, 0.5, "relu", True, fp32, "relu"),
    Case(3, 75, 203, 0.05, "gelu_tanh", True, fp16, "identity"),
    Case(3, 97, 131, 1.0, "silu", True, fp32, "identity"),
    Case(16, 33, 301, 0.1, "relu", False, bf16, "identity"),
    Case(16, 75, 203, 0.5, "gelu", False, fp32, "relu"),
    Case(17, 97, 131, "one", "silu", True, fp16, "identity"),
]


@pytest.mark.parametrize("case", GATED_CASES, ids=case_id)
def test_gated_kernels_match_masked_dense_mlp(case):
    run_and_check(case, seed=100 + GATED_CASES.index(case))


def row_masks(m: int, f: int, seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row mask (M, F), idx: the union of its kept neurons): each row keeps its own ~10% of the
    neurons; "bool", or "scale": float weights in (0, 2) on the kept ones (the fp64 master copy)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(m, f, generator=g) < 0.1
    keep[0, 0] = True  # at least one neuron
    values = keep if kind == "bool" else keep * (2 * torch.rand(m, f, generator=g, dtype=torch.float64))
    return values.to(DEVICE), keep.any(0).nonzero().squeeze(1).to(DEVICE)


@pytest.mark.parametrize("m, split, kind, up_activation", [
    (1, 1, "bool", None), (3, 2, "scale", "identity"), (5, 1, "bool", "relu"), (16, 2, "scale", None),
    (17, 1, "bool", "identity"),
])
def test_row_masks_select_or_scale_each_row_own_neurons(m, split, kind, up_activation):
    """Rows keeping different neurons: the kernels run over their union and apply each row's mask."""
    case = Case(m, 75, 203, 0.1, "silu" if up_activation else "gelu", True, fp32 if kind == "scale" else bf16,
                up_activation)
    reference_ops = operands(case, seed=m)
    row_mask, idx = row_masks(m, case.f, seed=m, kind=kind)
    reference_ops[-1] = idx
    ops = cast(reference_ops, case.dtype)
    mask = row_mask if kind == "bool" else row_mask.to(case.dtype)
    out = poisoned_like(torch.empty(m, case.d, dtype=case.dtype, device=DEVICE))
    options = {"up_activation": up_activation} if case.gated else {}
    config = small_tiles(m, split)
    generated(case.activation, case.gated, up_activation or "identity").launch(
        *ops, out, activation=case.activation, row_mask=mask, config=config, **options)
    math = {"activation": case.activation, "up_activation": up_activation}
    reference = masked_dense(*reference_ops, **math, row_mask=row_mask)
    baseline = masked_dense(*ops, **math, row_mask=mask)
    assert_close_by_rule(out, baseline, reference)
    reference_fn = gated_sparse_mlp_reference if case.gated else sparse_mlp_reference
    torch.testing.assert_close(reference_fn(*reference_ops, **{k: v for k, v in math.items() if v}, row_mask=row_mask),
                               reference, rtol=1e-12, atol=1e-12)


def small_tiles(m: int, split: int) -> dict:
    """Tiles smaller than the sizes (several tiles per axis, masked edges) and split reductions."""
    rows = 16 if m >= 16 else 2
    side = 16 if m >= 16 else 8
    return {
        "up": {"BLOCK_M": rows, "BLOCK_K": side, "BLOCK_D": 16, "SPLIT_D": split, "num_warps": 4, "num_stages": 2},
        "down": {"BLOCK_M": rows, "BLOCK_D": side, "BLOCK_K": 16, "SPLIT_K": split, "num_warps": 4, "num_stages": 2},
    }


@pytest.mark.parametrize("m, split, up_activation", [
    (1, 1, None), (3, 4, None), (16, 2, None), (17, 4, None), (3, 4, "identity"), (16, 2, "identity"),
])
def test_small_tiles_and_split_reductions(m, split, up_activation):
    """Splits meet in the workspace (the gated up kernel's two partial sums side by side); a
    second launch shows the kernels left it zeroed."""
    case = Case(m, 75, 203, 0.2, "gelu" if up_activation is None else "silu", True, fp32, up_activation)
    for seed in (100, 101):
        run_and_check(case, seed, config=small_tiles(m, split))


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("up_activation", [None, "identity"], ids=["plain", "gated"])
def test_strided_operands_and_int32_indices(m, up_activation):
    """x every other column of a wider buffer, w1 a column slice, w3 transposed storage, w2
    column-major (the fast layout), b2 a strided view, idx int32."""
    def prepare(ops):
        x, w1, b1, *up, w2, b2, idx = ops
        wide_x = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        wide_x[:, ::2] = x
        strided_b2 = torch.stack([b2, b2], dim=1)[:, 0]
        up = [up[0].t().contiguous().t(), up[1]] if up else []
        return [wide_x[:, ::2], torch.cat([w1, w1], dim=1)[:, : w1.shape[1]], b1, *up, column_major(w2),
                strided_b2, idx.to(torch.int32)]

    run_and_check(Case(m, 75, 203, 0.1, "relu", True, bf16, up_activation), seed=7, prepare=prepare)


def test_split_workspaces_are_per_thread():
    """Threads share a device's default stream, so each keeps its own workspace: two running the
    same model at once would otherwise interleave partial sums in one buffer."""
    module = generated("relu")
    here = module._WORKSPACES.views(DEVICE, fp32, (64,), (4,), (2, 3))
    there = []
    thread = threading.Thread(target=lambda: there.append(module._WORKSPACES.views(DEVICE, fp32, (64,), (4,), (2, 3))))
    thread.start()
    thread.join()
    assert module._WORKSPACES.views(DEVICE, fp32, (64,), (4,), (2, 3)) is here  # reused within a thread
    assert all(theirs.data_ptr() != ours.data_ptr() for theirs, ours in zip(there[0], here))


def test_empty_batch_leaves_out_alone():
    ops = cast(operands(Case(1, 33, 65, 0.1), seed=3), fp32)
    out = torch.empty(0, 33, device=DEVICE)
    assert generated("relu").launch(torch.empty(0, 33, device=DEVICE), *ops[1:], out, activation="relu") is out


def test_reference_is_the_masked_dense_mlp():
    for activation in ACTIVATIONS:
        ops = operands(Case(5, 33, 65, 0.3, activation), seed=11, device="cpu")
        torch.testing.assert_close(sparse_mlp_reference(*ops, activation=activation),
                                   masked_dense(*ops, activation=activation), rtol=1e-12, atol=1e-12)
        for up_activation in ("identity", "relu"):
            ops = operands(Case(5, 33, 65, 0.3, activation, up_activation=up_activation), seed=12, device="cpu")
            math = {"activation": activation, "up_activation": up_activation}
            torch.testing.assert_close(gated_sparse_mlp_reference(*ops, **math), masked_dense(*ops, **math),
                                       rtol=1e-12, atol=1e-12)


def test_unsupported_operands_are_named():
    x, w1, b1, w2, b2, idx = cast(operands(Case(2, 33, 65, 0.1), seed=5, device="cpu"), fp16)
    assert unsupported_reason(x, w1, b1, w2, b2, idx, activation="relu") is None
    assert unsupported_reason(x, w1, b1, w2, b2, idx, activation="silu", w3=w1, b3=None) is None
    reasons = {
        "tanh": unsupported_reason(x, w1, b1, w2, b2, idx, activation="tanh"),
        "up activation 'tanh'": unsupported_reason(x, w1, b1, w2, b2, idx, activation="relu", w3=w1,
                                                   up_activation="tanh"),
        "w3 is": unsupported_reason(x, w1, b1, w2, b2, idx, activation="relu", w3=w1[:, :-1]),
        "row_mask is": unsupported_reason(x, w1, b1, w2, b2, idx, activation="relu", row_mask=x.float()),
        "b3 is": unsupported_reason(x, w1, b1, w2, b2, idx, activation="relu", w3=w1, b3=b1.float()),
        "float64": unsupported_reason(x.double(), w1.double(), None, w2.double(), None, idx, activation="relu"),
        "idx must be": unsupported_reason(x, w1, b1, w2, b2, idx.float(), activation="relu"),
        "selects 0": unsupported_reason(x, w1, b1, w2, b2, idx[:0], activation="relu"),
        "w2 is": unsupported_reason(x, w1, b1, w2.t(), b2, idx, activation="relu"),
        "b1 is": unsupported_reason(x, w1, b1.float(), w2, b2, idx, activation="relu"),
    }
    for expected, reason in reasons.items():
        assert reason is not None and expected in reason, (expected, reason)


def test_launch_rejects_what_it_was_not_generated_for():
    ops = cast(operands(Case(2, 33, 65, 0.1), seed=5), fp16)
    out = torch.empty(2, 33, dtype=fp16, device=DEVICE)
    with pytest.raises(ValueError, match="generated for relu, not gelu"):
        generated("relu").launch(*ops, out, activation="gelu")
    with pytest.raises(ValueError, match="idx must be"):
        generated("relu").launch(*ops[:5], ops[5].float(), out, activation="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseMLPSpec("tanh")
    with pytest.raises(ValueError, match="needs gated=True"):
        SparseMLPSpec("relu", up_activation="relu")
    w3, b3 = ops[1].clone(), None
    with pytest.raises(ValueError, match="generated for silu gate and identity up, not silu and relu"):
        generated("silu", True).launch(*ops[:3], w3, b3, *ops[3:], out, activation="silu", up_activation="relu")


def test_rendered_module_documents_itself():
    source = render_sparse_mlp(SparseMLPSpec("gelu_tanh"))
    assert kernel_name(SparseMLPSpec("gelu_tanh")) == "sparse_mlp_gelu_tanh"
    assert "SparseMLPSpec(activation='gelu_tanh', gated=False, up_activation='identity')" in source
    assert "fc2.weight" in source and "tl.sigmoid" in source and "tl.math.erf" not in source
    assert "w3" not in source and "_up_activation" not in source
    dre_lu = SparseMLPSpec("relu", gated=True, up_activation="relu")
    source = render_sparse_mlp(dre_lu)
    assert kernel_name(dre_lu) == "sparse_mlp_gated_relu_relu"
    assert kernel_name(SparseMLPSpec("silu", gated=True)) == "sparse_mlp_gated_silu"
    assert "up_proj.weight" in source and "_activation(acc) * _up_activation(acc3)" in source


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 64])
@pytest.mark.parametrize("gated", [False, True])
def test_configs_pick_the_path_and_fill_the_gpu(m, gated):
    d, k, sm_count = 4096, 1638, 132
    up_budget = 8192 // 2 if gated else 8192  # a gated up kernel holds two GEMV products
    for config in [default_config(m, d, k, sm_count=sm_count, gated=gated),
                   *config_space(m, d, k, sm_count=sm_count, gated=gated)]:
        for kernel, out_block, red_block, split, n_out, n_red in (("up", "BLOCK_K", "BLOCK_D", "SPLIT_D", k, d),
                                                                  ("down", "BLOCK_D", "BLOCK_K", "SPLIT_K", d, k)):
            tile = config[kernel]
            assert (tile["BLOCK_M"] >= 16) == (m > 8), "tl.dot exactly when the row tile is 16+"
            if tile["BLOCK_M"] >= 16:
                assert min(tile[out_block], tile[red_block]) >= 16
            else:
                assert tile["BLOCK_M"] * tile[out_block] * tile[red_block] <= (up_budget if kernel == "up" else 8192)
            programs = -(-n_out // tile[out_block]) * -(-m // tile["BLOCK_M"])
            assert programs * tile[split] <= max(programs, 2 * sm_count)
            assert tile[split] <= -(-n_red // tile[red_block])
    assert config_space(m, d, k, gated=gated) == [default_config(m, d, k, gated=gated)], "nothing to tune on the CPU"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_opt_6_7b_sizes_bf16(m):
    case = Case(m, 4096, 16384, 0.1, "relu", True, bf16)
    run_and_check(case, seed=m)
    run_and_check(case, seed=m + 1, prepare=lambda ops: [*ops[:3], column_major(ops[3]), *ops[4:]])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_every_autotuning_candidate_bf16(m):
    case = Case(m, 4096, 16384, 0.1, "gelu", True, bf16)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    for config in config_space(m, case.d, case.k, sm_count=sm_count):
        run_and_check(case, seed=3, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_relu_llama_2_7b_sizes_bf16(m):
    """ReLU-fied Llama-2-7B's MLP (d 4096, ffn 11008, no biases), gated, at 10% density."""
    case = Case(m, 4096, 11008, 0.1, "relu", False, bf16, "identity")
    run_and_check(case, seed=m, prepare=lambda ops: [*ops[:5], column_major(ops[5]), *ops[6:]])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_every_gated_autotuning_candidate_bf16(m):
    case = Case(m, 4096, 11008, 0.1, "silu", False, bf16, "identity")
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    for config in config_space(m, case.d, case.k, sm_count=sm_count, gated=True):
        run_and_check(case, seed=5, config=config)

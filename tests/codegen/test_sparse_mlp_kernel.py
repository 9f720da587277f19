"""The DejaVu gather kernels (codegen/sparse_mlp.py, templates/sparse_mlp.py.jinja).

Every kernel case draws fresh random inputs, poisons `out` with NaN, launches the generated
module and holds it to the tolerance rule of tests/numerics.py: the reference is the masked
dense MLP fc2(act(fc1(x)) * mask) in fp64, the baseline the same math in the dtype under test.
The cases cover densities {1 neuron, 5%, 10%, 50%, 100%}, batches {1, 3, 16} (GEMV and tl.dot
paths), ReLU / GELU / GELU-tanh, with and without biases, at odd model and ffn widths; a grid
that covers each value several times rather than their full product.

Without CUDA the kernels run on Triton's interpreter on CPU tensors, so sizes stay small; with
CUDA the same cases run compiled, and the `gpu` tests add OPT-6.7B sizes (d 4096, ffn 16384).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from codegen.sparse_mlp import (
    ACTIVATIONS,
    SparseMLPSpec,
    column_major,
    config_space,
    default_config,
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
def generated(activation: str):
    module, _ = load_source(kernel_name(SparseMLPSpec(activation)), render_sparse_mlp(SparseMLPSpec(activation)))
    return module


@dataclass(frozen=True)
class Case:
    """One launch: M rows, model width d, ffn width f, density ("one" = a single neuron)."""

    m: int
    d: int
    f: int
    density: float | str
    activation: str = "relu"
    bias: bool = True
    dtype: torch.dtype = fp16

    @property
    def k(self) -> int:
        return 1 if self.density == "one" else max(1, round(self.density * self.f))


def operands(case: Case, seed: int, device=DEVICE):
    """fp64 (x, w1, b1, w2, b2) drawn fresh from N(0, 1) at fan-in scale, and k unique indices."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.m, case.d, generator=g, dtype=torch.float64)
    w1 = torch.randn(case.f, case.d, generator=g, dtype=torch.float64) / case.d ** 0.5
    w2 = torch.randn(case.d, case.f, generator=g, dtype=torch.float64) / case.k ** 0.5
    b1 = torch.randn(case.f, generator=g, dtype=torch.float64) * 0.5 if case.bias else None
    b2 = torch.randn(case.d, generator=g, dtype=torch.float64) * 0.5 if case.bias else None
    idx = torch.randperm(case.f, generator=g)[:case.k].sort().values
    tensors = [None if t is None else t.to(device) for t in (x, w1, b1, w2, b2, idx)]
    return tensors


def cast(tensors, dtype):
    return [None if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors[:5]] + [tensors[5]]


def masked_dense(x, w1, b1, w2, b2, idx, *, activation):
    """The reference: the dense MLP with the unselected neurons zeroed, fc2(act(fc1(x)) * mask)."""
    mask = torch.zeros(w1.shape[0], dtype=x.dtype, device=x.device).index_fill(0, idx, 1.0)
    return F.linear(ACTIVATIONS[activation](F.linear(x, w1, b1)) * mask, w2, b2)


def run_and_check(case: Case, seed: int, *, config=None, prepare=lambda ops: ops):
    reference_ops = operands(case, seed)
    ops = prepare(cast(reference_ops, case.dtype))
    x = ops[0]
    out = poisoned_like(torch.empty(case.m, case.d, dtype=case.dtype, device=x.device))
    generated(case.activation).launch(*ops, out, activation=case.activation, config=config)
    reference = masked_dense(*reference_ops, activation=case.activation)
    baseline = masked_dense(*cast(reference_ops, case.dtype), activation=case.activation)
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c.m}-d{c.d}-f{c.f}-{c.density}-{c.activation}-"
                         f"{'bias' if c.bias else 'nobias'}-{str(c.dtype)[6:]}")
def test_kernels_match_masked_dense_mlp(case):
    run_and_check(case, seed=CASES.index(case))


def small_tiles(m: int, split: int) -> dict:
    """Tiles smaller than the sizes (several tiles per axis, masked edges) and split reductions."""
    rows = 16 if m >= 16 else 2
    side = 16 if m >= 16 else 8
    return {
        "up": {"BLOCK_M": rows, "BLOCK_K": side, "BLOCK_D": 16, "SPLIT_D": split, "num_warps": 4, "num_stages": 2},
        "down": {"BLOCK_M": rows, "BLOCK_D": side, "BLOCK_K": 16, "SPLIT_K": split, "num_warps": 4, "num_stages": 2},
    }


@pytest.mark.parametrize("m, split", [(1, 1), (3, 4), (16, 2), (17, 4)])
def test_small_tiles_and_split_reductions(m, split):
    """Splits meet in the workspace; a second launch shows the kernels left it zeroed."""
    case = Case(m, 75, 203, 0.2, "gelu", True, fp32)
    for seed in (100, 101):
        run_and_check(case, seed, config=small_tiles(m, split))


@pytest.mark.parametrize("m", [1, 16])
def test_strided_operands_and_int32_indices(m):
    """x every other column of a wider buffer, w1 a column slice, w2 column-major (the fast
    layout), b2 a strided view, idx int32."""
    def prepare(ops):
        x, w1, b1, w2, b2, idx = ops
        wide_x = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        wide_x[:, ::2] = x
        strided_b2 = torch.stack([b2, b2], dim=1)[:, 0]
        return [wide_x[:, ::2], torch.cat([w1, w1], dim=1)[:, : w1.shape[1]], b1, column_major(w2),
                strided_b2, idx.to(torch.int32)]

    run_and_check(Case(m, 75, 203, 0.1, "relu", True, bf16), seed=7, prepare=prepare)


def test_empty_batch_leaves_out_alone():
    ops = cast(operands(Case(1, 33, 65, 0.1), seed=3), fp32)
    out = torch.empty(0, 33, device=DEVICE)
    assert generated("relu").launch(torch.empty(0, 33, device=DEVICE), *ops[1:], out, activation="relu") is out


def test_reference_is_the_masked_dense_mlp():
    for activation in ACTIVATIONS:
        ops = operands(Case(5, 33, 65, 0.3, activation), seed=11, device="cpu")
        torch.testing.assert_close(sparse_mlp_reference(*ops, activation=activation),
                                   masked_dense(*ops, activation=activation), rtol=1e-12, atol=1e-12)


def test_unsupported_operands_are_named():
    x, w1, b1, w2, b2, idx = cast(operands(Case(2, 33, 65, 0.1), seed=5, device="cpu"), fp16)
    assert unsupported_reason(x, w1, b1, w2, b2, idx, activation="relu") is None
    reasons = {
        "silu": unsupported_reason(x, w1, b1, w2, b2, idx, activation="silu"),
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
        SparseMLPSpec("silu")


def test_rendered_module_documents_itself():
    source = render_sparse_mlp(SparseMLPSpec("gelu_tanh"))
    assert kernel_name(SparseMLPSpec("gelu_tanh")) == "sparse_mlp_gelu_tanh"
    assert "SparseMLPSpec(activation='gelu_tanh')" in source
    assert "fc2.weight" in source and "tl.sigmoid" in source and "tl.math.erf" not in source


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 64])
def test_configs_pick_the_path_and_fill_the_gpu(m):
    d, k, sm_count = 4096, 1638, 132
    for config in [default_config(m, d, k, sm_count=sm_count), *config_space(m, d, k, sm_count=sm_count)]:
        for kernel, out_block, red_block, split, n_out, n_red in (("up", "BLOCK_K", "BLOCK_D", "SPLIT_D", k, d),
                                                                  ("down", "BLOCK_D", "BLOCK_K", "SPLIT_K", d, k)):
            tile = config[kernel]
            assert (tile["BLOCK_M"] >= 16) == (m > 8), "tl.dot exactly when the row tile is 16+"
            if tile["BLOCK_M"] >= 16:
                assert min(tile[out_block], tile[red_block]) >= 16
            else:
                assert tile["BLOCK_M"] * tile[out_block] * tile[red_block] <= 8192
            programs = -(-n_out // tile[out_block]) * -(-m // tile["BLOCK_M"])
            assert programs * tile[split] <= max(programs, 2 * sm_count)
            assert tile[split] <= -(-n_red // tile[red_block])
    assert config_space(m, d, k) == [default_config(m, d, k)], "nothing to tune on the interpreter"


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

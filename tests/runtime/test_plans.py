"""Per-signature plans (runtime.plans): a repeat call reuses what the first decided, a call whose
operands differ only in strides gets a plan of its own, and both give the first call's answer."""
from __future__ import annotations

import pytest
import torch

import compiler
from models import dejavu
from runtime import library
from runtime import plans
from runtime.bound import UNBOUND, Bound, FastCall
from runtime.library import as_tuple, lookup
from runtime.plans import COPIED, IDENTITY, Plans, View, signature_check
from tests.runtime.test_custom_ops import CASES, recorded_calls

FAMILY_CASES = ["attention", "attention_causal_gqa", "attention_mask_state", "attention_scale_state",
                "multihead_attention_padding", "long_conv_transposed", "long_conv_circular", "short_conv",
                "sparse_mlp_gathered", "sparse_mlp_masked", "ssm_scan_with_state", "ssm_state_update", "ssd_scan",
                "ssd_scan_with_state", "ssd_state_update"]


def relaid(tensor: torch.Tensor) -> torch.Tensor:
    """The same values with other strides: the last two dims stored transposed (or a strided copy)."""
    if tensor.dim() >= 2:
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.empty(tensor.shape[0] * 2, dtype=tensor.dtype)[::2].copy_(tensor) if tensor.dim() else tensor.clone()


def fused_calls(name: str) -> list[tuple]:
    """(FusedOp, operands) of each fused-op call the case's compiled model makes."""
    _, calls = recorded_calls(CASES[name])
    return [(lookup(key), operands) for _, (operands, key) in calls]


def fast_paths(op) -> list:
    """The op's fast paths (runtime.dispatch.FusedOp.fast_path) made so far."""
    return [] if op._fast_paths is None else [path for path in op._fast_paths.values() if path is not None]


def outputs_of(op, operands) -> list[torch.Tensor]:
    result = op.custom_op(list(operands), op.key)
    return list(result[:-1] if op.differentiable else as_tuple(result))  # (a _saving op's residuals dropped)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_repeat_and_relaid_calls_reuse_plans_and_agree(name):
    for op, operands in fused_calls(name):
        with torch.no_grad():
            first = outputs_of(op, operands)
            plans = len(op._plans)
            again = outputs_of(op, operands)
            assert len(op._plans) == plans  # the repeat call found its plan
            other = outputs_of(op, [relaid(t) for t in operands])
        assert len(op._plans) == plans + 1  # other strides: a signature of its own
        for expected, found in zip(first, again):
            torch.testing.assert_close(found, expected, rtol=0, atol=0, equal_nan=True)
        for expected, found in zip(first, other):
            torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_view_between():
    x = torch.randn(4, 6)
    assert View.between(x, x) is IDENTITY
    assert View.between(x, x[()]) is IDENTITY  # a new tensor object, the same elements and layout
    view = View.between(x, x[1:, ::2].t())
    assert torch.equal(view.of(x.clone()), x[1:, ::2].t())
    assert View.between(x, x.t().reshape(24)) is COPIED
    empty = torch.empty(0, 6)
    assert View.between(empty, empty.t()).of(empty).shape == (6, 0)


@pytest.mark.parametrize("guards", ["TorchDynamo's", "none"])
def test_signature_check_tells_every_part_of_a_signature(guards, monkeypatch):
    if guards == "none":
        monkeypatch.setattr(plans, "TensorGuards", None)
    x, y = torch.randn(3, 4), torch.randn(4)
    check = signature_check([x, y])
    assert check([torch.randn(3, 4), torch.randn(4)])
    for other in ([x.t().contiguous().t(), y], [torch.randn(3, 5), y], [x.double(), y],
                  [x, y.requires_grad_(True)], [x], [x, y, y]):
        assert not check(other)


def fresh_values(tensor: torch.Tensor) -> torch.Tensor:
    """Other values of the same signature (floating-point operands redrawn; masks and indices kept)."""
    return torch.randn_like(tensor) if tensor.is_floating_point() else tensor.clone()


def fast_calls(op) -> list[FastCall]:
    """The FastCall each of the op's fast paths is, or calls (after a check of its own, and through
    runtime.bound.direct_once_bound)."""
    return [_fast_call(path) for path in fast_paths(op)]


def _fast_call(function) -> FastCall | None:
    """`function` if a FastCall, else the first one its closure holds, looked for through the functions
    it holds."""
    if isinstance(function, FastCall):
        return function
    cells = [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()]
    return next(filter(None, (_fast_call(value) for value in cells if callable(value))), None)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_bound_launches_and_fast_paths_agree_with_the_launchers(name):
    """Calls after the first replay their plan's bound launch (runtime.bound), through the op's fast
    path where it has one (bound itself on its first call, replayed after it); on fresh values they
    give what the launchers give with no plan made yet."""
    torch.manual_seed(0)
    for op, operands in fused_calls(name):
        with torch.no_grad():
            for _ in range(2):
                outputs_of(op, [fresh_values(t) for t in operands])
            other = [fresh_values(t) for t in operands]
            replayed = outputs_of(op, other)
            bound = [plan.launch.bound for plan in op._plans.values() if getattr(plan, "launch", None)]
            flattened = [fast.bound for fast in fast_calls(op) if fast.bound is not UNBOUND]  # (one called)
            op._plans.clear()
            op._fast_paths, op._latest_fast_path = Plans(), None
            launched = outputs_of(op, other)
        if name != "sparse_mlp_masked":  # its selection's size, read from values, shapes each launch: never bound
            assert all(isinstance(found, Bound) for found in bound + flattened), bound + flattened
        for expected, found in zip(launched, replayed):
            torch.testing.assert_close(found, expected, rtol=0, atol=0, equal_nan=True)


FAST_PATHS = {"attention": 1, "attention_causal_gqa": 1, "attention_mask_state": 1, "short_conv": 1,
              "ssm_scan_with_state": 1, "ssm_state_update": 1, "ssd_scan": 1, "ssd_scan_with_state": 1,
              "ssd_state_update": 1, "long_conv_transposed": 1, "long_conv_circular": 1, "attention_scale_state": 0,
              "sparse_mlp_masked": 0,  # its selection is read from values
              "sparse_mlp_gathered": 0}  # its indices are a graph input, checked per call


@pytest.mark.parametrize("name", FAST_PATHS)
def test_ops_whose_plans_decide_everything_take_a_fast_path(name):
    for op, operands in fused_calls(name):
        with torch.no_grad():
            for _ in range(2):
                outputs_of(op, operands)
        assert len(fast_paths(op)) == FAST_PATHS[name]


def test_the_gathered_sparse_mlp_with_proven_indices_takes_a_fast_path():
    model, args = dejavu.tiny_gathered()
    compiled = compiler.compile(model.eval())
    with torch.no_grad():
        for _ in range(3):
            args = [fresh_values(arg) for arg in args]
            with library.recording() as calls:
                found = compiled(*args)
            torch.testing.assert_close(found, model(*args), rtol=1e-4, atol=1e-4)
    sparse = [op for op, _ in calls if op.pattern == "sparse_mlp"]
    assert sparse and all(op.layout.indices_proven for op in sparse)
    assert all(any(path is not None for path in op._fast_paths.values()) for op in sparse)

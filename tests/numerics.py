"""The tolerance rule every equivalence test uses (FlashAttention's), in one place.

    err(ours vs reference) <= 2 * err(plain PyTorch in the same dtype vs reference) + eps

`reference` is the same math in fp32 (or fp64 on the CPU); `baseline` is the plain PyTorch
computation in the dtype under test. eps depends only on the dtype.
"""
from __future__ import annotations

import torch

EPS = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_by_rule(ours: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor) -> None:
    """Assert ours is at most twice as far from reference as baseline is, plus eps(dtype)."""
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    assert ours.dtype == baseline.dtype, f"dtype {ours.dtype} != {baseline.dtype}"
    ours_error = max_error(ours, reference)
    allowed = 2 * max_error(baseline, reference) + EPS[ours.dtype]
    assert ours_error <= allowed, f"max error {ours_error:.3e} > allowed {allowed:.3e} ({ours.dtype})"


def assert_each_close_by_rule(names, ours, baselines, references) -> None:
    """assert_close_by_rule on each named triple (gradients, say), the failure naming its tensor; where
    the reference is None (no gradient), ours is None or zero."""
    for name, mine, theirs, exact in zip(names, ours, baselines, references, strict=True):
        if exact is None:
            assert mine is None or not mine.any(), name
            continue
        try:
            assert_close_by_rule(mine, theirs, exact)
        except AssertionError as error:
            raise AssertionError(f"d {name}: {error}") from None


def poisoned_like(tensor: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so a kernel that skips an element is caught."""
    return torch.full_like(tensor, float("nan"))

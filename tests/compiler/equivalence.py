"""Compile a module, run it, and hold the result to the tolerance rule against fp64 eager."""
from __future__ import annotations

import copy

import torch

import compiler
from tests.numerics import assert_close_by_rule


def cast_inputs(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def assert_compiles_equivalent(module: torch.nn.Module, args, dtype: torch.dtype, pattern: str, count: int = 1,
                               **options):
    """Compile `module` in `dtype` (with compile() `options`); assert `count` fused `pattern` ops and
    outputs within the rule."""
    module = module.eval()
    ours_module = copy.deepcopy(module).to(dtype)
    compiled = compiler.compile(ours_module, strict=True, **options)
    with torch.no_grad():
        ours = compiled(*cast_inputs(args, dtype))
        baseline = ours_module(*cast_inputs(args, dtype))
        reference = copy.deepcopy(module).double()(*cast_inputs(args, torch.float64))
    fired = compiled.patterns.count(pattern)
    assert fired == count, f"expected {count} {pattern} op(s), got {fired}:\n{compiled.report()}"
    assert_close_by_rule(ours, baseline, reference)
    return compiled

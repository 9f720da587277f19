"""Passes emit data; compiler.lower alone builds the runtime ops (DESIGN.md: passes only match and emit
data, the lowering step renders, loads and tunes kernels through one registry of families)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import compiler
from ir.fused import FusedSpec, MaskForm
from runtime.families import FAMILIES
from tests.compiler.test_attention_pass import Sdpa, qkv

PASSES = Path(compiler.__file__).parent / "passes"
ALLOWED = ("ir", "compiler.passes", "compiler.report", "torch", "networkx")  # besides the standard library


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", sorted(PASSES.rglob("*.py")), ids=lambda path: str(path.relative_to(PASSES)))
def test_passes_import_ir_only(path):
    project = {module for module in imported_modules(path) if module.split(".")[0] in ("compiler", "runtime", "codegen",
                                                                                        "models", "benchmarks")}
    assert all(module.startswith(ALLOWED) for module in project), project


def test_a_spec_is_read_only_data():
    spec = FusedSpec("attention", {"scale": 0.5, "static_form": MaskForm()})
    assert spec.op == "attention"
    with pytest.raises(TypeError):
        spec.params["scale"] = 1.0


def test_lowering_builds_each_fused_node_through_the_registry():
    compiled = compiler.compile(Sdpa(is_causal=True), strict=True)
    with torch.no_grad():
        compiled(*qkv(1, 2, 7, 7, 8))
    (op,) = compiled._report.ops
    assert type(op) is FAMILIES["attention"].op and op.label == compiled._report.fused[0].op_name
    assert compiled.patterns == ["attention"] and op.kernels, compiled.report()

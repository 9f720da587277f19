"""benchmarks/gpu_check.py's CPU rehearsal: `--quick` runs the check's whole path on Triton's
interpreter at tiny sizes, in a subprocess as on the GPU machine, and leaves the files a GPU run
leaves; `--budget-s 0` names every test and config as not run.

The GPU machine returns at most 8 files, at most 2 folders down, so the check must fit that.
The selected GPU tests are skipped here, but collecting them proves the selection still names
existing tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compiler  # noqa: F401  (switches Triton's interpreter on before the benchmarks import Triton)
from benchmarks.gpu_check import GPU_TESTS, SUITES

ROOT = Path(__file__).resolve().parents[2]
FILES = {"summary.md", "summary.json", "gpu_tests.txt", "gpu_check.log"}


def run_check(out: Path, cache: Path, *args: str) -> dict:
    """Run the check into `out` (kernels cached in `cache`), assert the output's shape, and return
    summary.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLASHFX_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--out", str(out), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [path.relative_to(out) for path in out.rglob("*") if path.is_file()]
    assert len(paths) <= 8 and all(len(path.parts) <= 3 for path in paths), paths
    assert FILES <= {str(path) for path in paths}
    assert "# flashfx GPU check" in result.stdout
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    return run_check(out, tmp_path_factory.mktemp("cache")), (out / "summary.md").read_text()


def test_quick_run_finds_every_selected_test(quick):
    payload, _ = quick
    assert payload["gpu_tests"]["outcomes"] == {test: "SKIPPED" for test in GPU_TESTS}


def test_quick_run_measures_every_headline_config(quick):
    payload, summary = quick
    assert list(payload["suites"]) == [*SUITES]
    for name in SUITES:
        rows = payload["suites"][name]
        assert rows and all(row["ours_ms"] for row in rows), (name, rows)
        assert all("fraction_of_ceiling" in row and row["ratios"] for row in rows)
        assert f"## {name}" in summary and "| x " in summary


def test_training_measures_the_backward_kernels(quick):
    payload, summary = quick
    rows = payload["suites"]["attention_training"]
    assert [row["config"].get("pass", "step") for row in rows] == ["fwd+bwd", "bwd", "step"]
    assert all("not all in flashfx kernels" not in row["notes"] for row in rows)
    scan = payload["suites"]["ssm_training"]
    assert scan and all(row["ours_ms"] and "fell back" not in row["notes"] for row in scan), scan


def test_no_budget_names_everything_as_not_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-no-budget")
    payload = run_check(out, tmp_path_factory.mktemp("cache"), "--budget-s", "0")
    assert set(payload["gpu_tests"]["outcomes"].values()) == {"not run: the tests' time budget was spent"}
    rows = [row for name in SUITES for row in payload["suites"][name]]
    assert rows and all(row["notes"].startswith("not run") for row in rows)
    assert "not run: the tests' time budget was spent" in (out / "summary.md").read_text()

"""Shared and read-only caches, checked as another user: root's test process warms a cache, and a
child running as uid 65534 (no root override of file permissions) reads it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from runtime.autotune import Autotuner, TuningKey
from runtime.bundle import export_cache, import_cache
from runtime.cache import SourceCache

REPO = Path(__file__).parents[2]
OTHER_USER = 65534  # nobody
PACKAGES = ("runtime", "codegen", "ir")  # what the child imports
SOURCE = "VALUE = 42\n"
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
TUNED = DEFAULT | {"BLOCK_M": 128}
KEY = TuningKey(kernel="attention_d16", source_hash="abc", bucket=(64, 64), dtype="float32",
                device="cpu-interpreter")

# Runs one expression over the cache at argv[1] and prints its value and the warnings it gave.
CHILD = """
import json, sys, warnings
from runtime.autotune import Autotuner, TuningKey
from runtime.cache import SourceCache
root = sys.argv[1]
KEY = TuningKey(kernel="attention_d16", source_hash="abc", bucket=(64, 64), dtype="float32", device="cpu-interpreter")
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
SOURCE = "VALUE = 42\\n"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    result = eval(sys.argv[2])
print(json.dumps({"result": result, "warnings": [str(w.message) for w in caught]}))
"""


@pytest.fixture
def shared():
    """A folder other users may enter (root's pytest tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="flashfx-shared-"))
    directory.chmod(0o755)
    (directory / "home").mkdir(mode=0o777)
    (directory / "home").chmod(0o777)
    yield directory
    shutil.rmtree(directory)


def as_other_user(shared: Path, expression: str) -> dict:
    """Evaluate `expression` (see CHILD) as uid 65534 over the cache shared/cache, with flashfx's
    packages copied into `shared` (the checkout may sit in a folder only root can enter)."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (setpriv or setuid to uid 65534)")
    source = shared / "src"
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = os.environ | {"HOME": str(shared / "home"), "TRITON_CACHE_DIR": str(shared / "home" / "triton"),
                        "PYTHONPATH": str(source)}
    probe = _run_as_other_user([sys.executable, "-c", "import torch, triton, filelock"], source, env)
    if probe.returncode != 0:
        pytest.skip(f"uid {OTHER_USER} cannot run this Python environment (its folder is private to root): "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    result = _run_as_other_user([sys.executable, "-c", CHILD, str(shared / "cache"), expression], source, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _run_as_other_user(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    setpriv = shutil.which("setpriv")
    options = {"user": OTHER_USER, "group": OTHER_USER, "extra_groups": []}
    if setpriv:
        command, options = [setpriv, f"--reuid={OTHER_USER}", f"--regid={OTHER_USER}", "--clear-groups", *command], {}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env, **options)


def warm(root: Path) -> None:
    SourceCache(root).store("demo", SOURCE)
    Autotuner(root).store(KEY, TUNED, {})


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_cache_files_respect_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        warm(tmp_path / "cache")
        export_cache(tmp_path / "cache.zip", tmp_path / "cache")
        import_cache(tmp_path / "cache.zip", tmp_path / "imported")
    finally:
        os.umask(previous)
    files = [path for path in tmp_path.rglob("*") if path.is_file() and not path.name.endswith(".lock")]
    assert len(files) == 5
    assert {path.name: path.stat().st_mode & 0o777 for path in files} == {path.name: mode for path in files}


def test_cache_warmed_by_another_user_is_read_without_warnings(shared):
    previous = os.umask(0o022)
    try:
        warm(shared / "cache")
    finally:
        os.umask(previous)
    kernel = SourceCache(shared / "cache").path_for("demo", SOURCE)
    seen = as_other_user(shared, "(str(SourceCache(root).store('demo', SOURCE)), "
                                 "Autotuner(root).config_for(KEY, DEFAULT, [], run=None, mode='default'))")
    assert seen == {"result": [str(kernel), TUNED], "warnings": []}


def test_read_only_cache_with_a_bad_tuned_config_is_a_miss_with_one_warning(shared):
    warm(shared / "cache")
    entry = Autotuner(shared / "cache").path_for(KEY)
    entry.write_text(entry.read_text()[:30])
    entry.chmod(0o644)
    seen = as_other_user(shared, "[Autotuner(root).config_for(KEY, DEFAULT, [], run=None, mode='default') "
                                 "for tuner in [Autotuner(root)] for _ in range(3)]")
    assert seen["result"] == [DEFAULT] * 3
    (warning,) = seen["warnings"]
    assert "corrupt" in warning and "could not remove" in warning
    assert entry.exists()


def test_unreadable_entries_are_misses_with_one_warning_each(shared):
    warm(shared / "cache")
    kernel = SourceCache(shared / "cache").path_for("demo", SOURCE)
    entry = Autotuner(shared / "cache").path_for(KEY)
    for path in (kernel, entry):
        path.chmod(0o600)
    seen = as_other_user(shared, "[(tuner.config_for(KEY, DEFAULT, [], run=None, mode='default'), "
                                 "SourceCache(root).store('demo', SOURCE).read_text()) "
                                 "for tuner in [Autotuner(root)] for _ in range(3)]")
    assert seen["result"] == [[DEFAULT, SOURCE]] * 3
    assert len(seen["warnings"]) == 2
    assert all("unreadable" in warning for warning in seen["warnings"])

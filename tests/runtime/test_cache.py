"""Kernel source cache and autotune cache: atomic, checksummed, concurrent-safe, strict mode."""
from __future__ import annotations

import json
import multiprocessing
import warnings

import pytest

from runtime.autotune import Autotuner, TuningKey, shape_bucket
from runtime.cache import CacheMissError, SourceCache

SOURCE = "VALUE = 42\n"
KEY = TuningKey(kernel="demo", source_hash="abc", bucket=(1024, 1024), dtype="bfloat16", device="cpu-interpreter")


def test_source_is_stored_once_under_its_hash(tmp_path):
    cache = SourceCache(tmp_path)
    path = cache.store("demo", SOURCE)
    assert path.read_text() == SOURCE and path.name.startswith("demo-")
    assert cache.store("demo", SOURCE) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left


def test_corrupt_source_is_detected_and_rewritten(tmp_path):
    cache = SourceCache(tmp_path)
    path = cache.store("demo", SOURCE)
    path.write_text(SOURCE[:3])
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.store("demo", SOURCE) == path
    assert path.read_text() == SOURCE


def test_unwritable_cache_falls_back_with_a_warning(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cache = SourceCache(blocker / "cache")
    with pytest.warns(UserWarning, match="not writable"):
        path = cache.store("demo", SOURCE)
    assert path.read_text() == SOURCE and blocker not in path.parents


def test_strict_cache_turns_a_miss_into_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_STRICT_CACHE", "1")
    with pytest.raises(CacheMissError):
        SourceCache(tmp_path).store("demo", SOURCE)
    tuner = Autotuner(tmp_path)
    with pytest.raises(CacheMissError):
        tuner.config_for(KEY, {"BLOCK": 1}, [{"BLOCK": 2}], run=lambda config: None, mode="max-autotune")
    with pytest.raises(CacheMissError, match="shape bucket"):
        tuner.config_for(KEY, {"BLOCK": 1}, [], run=lambda config: None, mode="default")


def test_shape_buckets_are_powers_of_two():
    assert [shape_bucket(n) for n in (0, 1, 2, 3, 113, 128, 129, 1023)] == [1, 1, 2, 4, 128, 128, 256, 1024]


def test_tuning_persists_and_is_reused_across_processes(tmp_path):
    calls = []
    tuner = Autotuner(tmp_path)
    best = tuner.config_for(KEY, {"BLOCK": 1}, [{"BLOCK": 2}, {"BLOCK": 3}],
                            run=lambda config: calls.append(config), mode="max-autotune")
    assert best in ({"BLOCK": 2}, {"BLOCK": 3}) and tuner.benchmarks_run == 1
    fresh = Autotuner(tmp_path)
    assert fresh.config_for(KEY, {"BLOCK": 1}, [], run=None, mode="max-autotune") == best
    assert fresh.benchmarks_run == 0


@pytest.mark.parametrize("damage", ["truncate", "edit", "version"])
def test_damaged_tuning_entry_is_reported_once_and_rebuilt(tmp_path, damage):
    tuner = Autotuner(tmp_path)
    tuner.store(KEY, {"BLOCK": 2}, {"{}": 1.0})
    path = tuner.path_for(KEY)
    entry = json.loads(path.read_text())
    if damage == "truncate":
        path.write_text(path.read_text()[:20])
    elif damage == "edit":
        entry["config"] = {"BLOCK": 999}
        path.write_text(json.dumps(entry))
    else:
        entry["format"] = 0
        path.write_text(json.dumps(entry))
    fresh = Autotuner(tmp_path)
    assert fresh.lookup(KEY) is None
    with pytest.warns(UserWarning, match="tuning it again"):
        assert fresh.config_for(KEY, {"BLOCK": 1}, [{"BLOCK": 5}], run=lambda c: None, mode="max-autotune") == {"BLOCK": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.config_for(KEY, {"BLOCK": 1}, [{"BLOCK": 6}], run=lambda c: None, mode="max-autotune") == {"BLOCK": 5}
    assert Autotuner(tmp_path).lookup(KEY) == {"BLOCK": 5}


def _warm(root: str, index: int) -> None:
    cache, tuner = SourceCache(root), Autotuner(root)
    for _ in range(20):
        cache.store("demo", SOURCE)
        tuner.store(KEY, {"BLOCK": index}, {"{}": float(index)})


def test_two_processes_warming_one_cache(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_warm, args=(str(tmp_path), i)) for i in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert SourceCache(tmp_path).path_for("demo", SOURCE).read_text() == SOURCE
    assert Autotuner(tmp_path).lookup(KEY) in ({"BLOCK": 1}, {"BLOCK": 2})


def test_export_import_round_trip_validates_entries(tmp_path):
    import zipfile

    from runtime.bundle import export_cache, import_cache

    source_root, target_root = tmp_path / "a", tmp_path / "b"
    SourceCache(source_root).store("demo", SOURCE)
    Autotuner(source_root).store(KEY, {"BLOCK": 4}, {"{}": 1.0})
    bundle = tmp_path / "cache.zip"
    assert export_cache(bundle, source_root) == 2
    with zipfile.ZipFile(bundle, "a") as archive:
        archive.writestr("kernels/evil-0123456789abcdef.py", "import os\n")
        archive.writestr("../escape.py", "x = 1\n")
    with pytest.warns(UserWarning, match="skipping"):
        assert import_cache(bundle, target_root) == 2
    assert Autotuner(target_root).lookup(KEY) == {"BLOCK": 4}
    assert SourceCache(target_root).path_for("demo", SOURCE).read_text() == SOURCE
    assert not (tmp_path / "escape.py").exists()

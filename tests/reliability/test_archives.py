"""import_cache on hostile or broken archives: names, sizes and the total are checked before
anything is decompressed, and an archive is installed whole or not at all."""
from __future__ import annotations

import json
import zipfile

import pytest

from runtime import bundle
from runtime.autotune import Autotuner, TuningKey
from runtime.bundle import ArchiveError, export_cache, import_cache
from runtime.cache import MAX_FILE_BYTES, SourceCache, source_hash

SOURCE = "VALUE = 42\n"
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
KEY = TuningKey(kernel="attention_d16", source_hash="abc", bucket=(64, 64), dtype="float32",
                device="cpu-interpreter")


def exported(tmp_path, config=DEFAULT):
    """A zip exported from a cache holding one kernel and one tuned config."""
    root = tmp_path / "warm"
    SourceCache(root).store("demo", SOURCE)
    Autotuner(root).store(KEY, config, {})
    path = tmp_path / "cache.zip"
    export_cache(path, root)
    return path


def installed(root) -> list:
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


@pytest.fixture
def opened(monkeypatch):
    """The names of the archive members that get decompressed."""
    names = []
    original = zipfile.ZipFile.open

    def spy(archive, name, mode="r", *args, **kwargs):
        if mode == "r":
            names.append(getattr(name, "filename", name))
        return original(archive, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


def test_oversized_entry_refuses_the_archive_before_decompressing(tmp_path, opened):
    path = exported(tmp_path)
    big = "#" * (MAX_FILE_BYTES + 1)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"kernels/big-{source_hash(big)}.py", big)
    with pytest.raises(ArchiveError, match="big-"):
        import_cache(path, tmp_path / "target")
    assert installed(tmp_path / "target") == [] and not any("big-" in name for name in opened)


def test_archive_over_the_total_limit_is_refused(tmp_path, monkeypatch):
    path = exported(tmp_path)
    monkeypatch.setattr(bundle, "MAX_ARCHIVE_BYTES", 100)
    with pytest.raises(ArchiveError, match="total"):
        import_cache(path, tmp_path / "target")
    assert installed(tmp_path / "target") == []


def test_archive_with_too_many_entries_is_refused(tmp_path, monkeypatch):
    path = exported(tmp_path)
    monkeypatch.setattr(bundle, "MAX_ENTRIES", 1)
    with pytest.raises(ArchiveError, match="entries"):
        import_cache(path, tmp_path / "target")


def test_foreign_entries_are_skipped_unread(tmp_path, opened):
    path = exported(tmp_path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("payload.bin", b"\0" * (64 << 20))
        archive.writestr("../escape.py", "x = 1\n")
    with pytest.warns(UserWarning, match="skipping"):
        assert import_cache(path, tmp_path / "target") == 2
    assert "payload.bin" not in opened and "../escape.py" not in opened
    assert len(installed(tmp_path / "target")) == 2


def test_damaged_member_installs_nothing(tmp_path):
    path = tmp_path / "cache.zip"
    other = "OTHER = 1\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"kernels/demo-{source_hash(SOURCE)}.py", SOURCE)
        archive.writestr(f"kernels/other-{source_hash(other)}.py", other)
        last = archive.infolist()[-1]
    data = bytearray(path.read_bytes())
    data[last.header_offset + 30 + len(last.filename)] ^= 0xFF  # first byte of its stored data
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="other-"):
        import_cache(path, tmp_path / "target")
    assert installed(tmp_path / "target") == []


def test_duplicate_entries_refuse_the_archive(tmp_path):
    path = exported(tmp_path)
    with zipfile.ZipFile(path, "a") as archive, pytest.warns(UserWarning, match="Duplicate"):
        archive.writestr(f"kernels/demo-{source_hash(SOURCE)}.py", SOURCE)
    with pytest.raises(ArchiveError, match="more than once"):
        import_cache(path, tmp_path / "target")


def test_a_file_that_is_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "cache.zip"
    path.write_text("not a zip")
    with pytest.raises(ArchiveError, match="not a zip"):
        import_cache(path, tmp_path / "target")


def test_tuned_config_invalid_for_its_template_is_skipped(tmp_path):
    path = exported(tmp_path, config=DEFAULT | {"BLOCK_M": 48})
    with pytest.warns(UserWarning, match="BLOCK_M=48"):
        assert import_cache(path, tmp_path / "target") == 1
    assert [p.suffix for p in installed(tmp_path / "target")] == [".py"]


def test_round_trip_installs_everything(tmp_path):
    path = exported(tmp_path)
    assert import_cache(path, tmp_path / "target") == 2
    assert Autotuner(tmp_path / "target").lookup(KEY) == DEFAULT
    entry = json.loads(Autotuner(tmp_path / "target").path_for(KEY).read_text())
    assert entry["config"] == DEFAULT


def test_export_into_a_missing_folder_names_the_folder(tmp_path):
    SourceCache(tmp_path / "warm").store("demo", SOURCE)
    with pytest.raises(FileNotFoundError, match="does not exist") as raised:
        export_cache(tmp_path / "missing" / "cache.zip", tmp_path / "warm")
    assert ".partial" not in str(raised.value) and str(tmp_path / "missing") in str(raised.value)

"""Ship a warmed cache with a deployment: export it to one zip file, import it elsewhere.

    export_cache("flashfx-cache.zip")    # kernels/*.py and autotune/*.json of the cache dir
    import_cache("flashfx-cache.zip")    # checked, then installed whole into the cache dir

Import trusts nothing, and reads the archive in two passes:

    1. the directory only: an entry whose name is not kernels/<name>-<hash>.py or
       autotune/<name>-<digest>.json is skipped unread (with a warning); more than MAX_ENTRIES
       entries, an entry declaring more than MAX_FILE_BYTES, a name given twice, or more than
       MAX_ARCHIVE_BYTES in all refuses the whole archive (ArchiveError) before anything is
       decompressed;
    2. each entry, streamed and cut at its declared size: a kernel must hash to its name, a tuned
       config must carry a valid checksum and fit its template (autotune.config_problem), or it
       is skipped with a warning; each is staged as a temporary file beside its destination.

Only when every entry has been read are the staged files renamed into place; a damaged member
or a failed write removes them all, so an import installs all of its valid entries or none.
"""
from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from runtime import knobs
from runtime.autotune import config_problem, entry_is_valid
from runtime.cache import MAX_FILE_BYTES, read_cache_file, source_hash, write_temp

MAX_ENTRIES = 100_000
MAX_ARCHIVE_BYTES = 2 << 30  # declared (uncompressed) bytes of all the entries an import reads

_KERNEL_NAME = re.compile(r"^kernels/[A-Za-z0-9_]+-([0-9a-f]{16})\.py$")
_TUNING_NAME = re.compile(r"^autotune/[A-Za-z0-9_]+-[0-9a-f]{24}\.json$")


class ArchiveError(ValueError):
    """The file given to import_cache is not an archive it will install anything from."""


def export_cache(path: str | Path, cache_dir: str | Path | None = None) -> int:
    """Write the cache's kernels and tuned configs into the zip file `path`; return the count."""
    root = Path(cache_dir) if cache_dir is not None else knobs.cache_dir()
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot export the cache to {target}: the folder {target.parent} does not exist "
                                "(create it first)")
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            count = sum(_export_member(archive, root, member) for member in _members(root))
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return count


def _members(root: Path) -> list[Path]:
    return sorted(root.glob("kernels/*.py")) + sorted(root.glob("autotune/*.json"))


def _export_member(archive: zipfile.ZipFile, root: Path, member: Path) -> bool:
    """Add one cache file, read as the cache reads it (no links followed, no FIFOs waited on)."""
    try:
        text = read_cache_file(member)
    except (OSError, UnicodeDecodeError) as error:
        warnings.warn(f"flashfx: not exporting {member}: {getattr(error, 'strerror', None) or error}", stacklevel=4)
        return False
    archive.writestr(member.relative_to(root).as_posix(), text)
    return True


def import_cache(path: str | Path, cache_dir: str | Path | None = None) -> int:
    """Check and install the entries of an exported zip; return how many were installed."""
    root = Path(cache_dir) if cache_dir is not None else knobs.cache_dir()
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"{path} is not a zip file ({error}); give a file written by export_cache") from None
    with archive:
        staged: list[tuple[Path, Path]] = []
        try:
            for info in _entries(archive, path):
                text = _read_entry(archive, info, path)
                if text is not None:
                    destination = root / info.filename
                    staged.append((write_temp(destination, text), destination))
            for temp, destination in staged:
                os.replace(temp, destination)
        finally:
            for temp, _ in staged:
                temp.unlink(missing_ok=True)
    return len(staged)


def _entries(archive: zipfile.ZipFile, path) -> list[zipfile.ZipInfo]:
    """The entries to read, checked from the archive's directory alone (see the module docstring)."""
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise ArchiveError(f"{path} has {len(infos)} entries, more than {MAX_ENTRIES}: not a flashfx cache")
    twice = sorted(name for name, count in Counter(info.filename for info in infos).items() if count > 1)
    if twice:
        raise ArchiveError(f"{path} holds {twice} more than once: not written by export_cache")
    entries = [info for info in infos if _is_cache_name(info.filename, path)]
    for info in entries:
        if info.file_size > MAX_FILE_BYTES:
            raise ArchiveError(f"{path}: entry {info.filename} declares {info.file_size} bytes, "
                               f"more than {MAX_FILE_BYTES}: not a flashfx cache entry")
    total = sum(info.file_size for info in entries)
    if total > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"{path} declares {total} bytes in total, more than {MAX_ARCHIVE_BYTES}")
    return entries


def _is_cache_name(name: str, path) -> bool:
    if _KERNEL_NAME.match(name) or _TUNING_NAME.match(name):
        return True
    warnings.warn(f"flashfx: skipping {name} from {path}: not a cache entry", stacklevel=4)
    return False


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> str | None:
    """The entry's text if it is a valid cache entry, else None (with a warning)."""
    try:
        with archive.open(info) as member:
            data = member.read(MAX_FILE_BYTES + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError) as error:
        raise ArchiveError(f"{path}: entry {info.filename} is damaged ({error}); nothing was installed") from None
    problem = _entry_problem(info.filename, data)
    if problem is None:
        return data.decode()
    warnings.warn(f"flashfx: skipping {info.filename} from {path}: {problem}", stacklevel=3)
    return None


def _entry_problem(name: str, data: bytes) -> str | None:
    """Why `data` is no valid cache entry under `name`, or None."""
    if len(data) > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES} bytes"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return "not UTF-8 text"
    kernel = _KERNEL_NAME.match(name)
    if kernel:
        return None if source_hash(text) == kernel.group(1) else "its source does not hash to its name"
    try:
        entry = json.loads(text)
    except ValueError:
        return "not JSON"
    if not entry_is_valid(entry):
        return "not a valid cache entry (checksum or format)"
    kernel = entry["key"].get("kernel") if isinstance(entry["key"], dict) else None
    if not isinstance(kernel, str):
        return "its key names no kernel"
    problem = config_problem(kernel, entry["config"])
    return f"its config is invalid for its template ({problem})" if problem else None

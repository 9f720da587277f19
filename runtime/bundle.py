"""Ship a warmed cache with a deployment: export it to one zip file, import it elsewhere.

    export_cache("flashfx-cache.zip")    # kernels/*.py and autotune/*.json of the cache dir
    import_cache("flashfx-cache.zip")    # validated, then written atomically into the cache dir

Import trusts nothing: a kernel source must hash to the name it carries, an autotune entry
must carry a valid checksum; anything else is skipped with a warning.
"""
from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path

from runtime import knobs
from runtime.autotune import entry_is_valid
from runtime.cache import atomic_write_text, source_hash

_KERNEL_NAME = re.compile(r"^kernels/[A-Za-z0-9_]+-([0-9a-f]{16})\.py$")
_TUNING_NAME = re.compile(r"^autotune/[A-Za-z0-9_]+-[0-9a-f]{24}\.json$")


def export_cache(path: str | Path, cache_dir: str | Path | None = None) -> int:
    """Write the cache's kernels and tuned configs into the zip file `path`; return the count."""
    root = Path(cache_dir) if cache_dir is not None else knobs.cache_dir()
    members = sorted(root.glob("kernels/*.py")) + sorted(root.glob("autotune/*.json"))
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            archive.write(member, member.relative_to(root).as_posix())
    partial.replace(target)
    return len(members)


def import_cache(path: str | Path, cache_dir: str | Path | None = None) -> int:
    """Validate and install the entries of an exported zip; return how many were installed."""
    root = Path(cache_dir) if cache_dir is not None else knobs.cache_dir()
    installed = 0
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            text = archive.read(name).decode(errors="replace")
            if _is_valid_member(name, text):
                atomic_write_text(root / name, text)
                installed += 1
            else:
                warnings.warn(f"flashfx: skipping {name} from {path}: not a valid cache entry", stacklevel=2)
    return installed


def _is_valid_member(name: str, text: str) -> bool:
    kernel = _KERNEL_NAME.match(name)
    if kernel:
        return source_hash(text) == kernel.group(1)
    if _TUNING_NAME.match(name):
        try:
            return entry_is_valid(json.loads(text))
        except ValueError:
            return False
    return False

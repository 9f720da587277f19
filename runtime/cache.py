"""On-disk cache of generated kernel sources.

Each source is stored under its content hash:

    <cache dir>/kernels/<kernel name>-<sha256[:16]>.py

Writes are atomic (write to a temporary file in the same folder, then rename), so a
crash never leaves a half-written kernel behind. A file whose bytes no longer hash to
its name (truncated, edited, corrupted) is detected and rewritten. When the cache
directory cannot be written, the cache warns once and falls back to a private
temporary directory for this process. Under FLASHFX_STRICT_CACHE=1 a source that is not
already cached is an error (CacheMissError) instead of being written.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

from runtime import knobs


class CacheMissError(RuntimeError):
    """Raised under FLASHFX_STRICT_CACHE=1 when a kernel or its tuned config is not cached."""


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SourceCache:
    """Content-addressed store of kernel sources in one directory."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else knobs.cache_dir()
        self._fallback: Path | None = None

    @property
    def kernel_dir(self) -> Path:
        return (self._fallback or self.root) / "kernels"

    def path_for(self, name: str, source: str) -> Path:
        return self.kernel_dir / f"{name}-{source_hash(source)}.py"

    def store(self, name: str, source: str) -> Path:
        """Return the path of a verified copy of `source`, writing it if needed."""
        path = self.path_for(name, source)
        if self._is_intact(path, source):
            return path
        if knobs.strict_cache():
            raise CacheMissError(f"kernel {path.name} is not in the cache {self.root} (FLASHFX_STRICT_CACHE=1)")
        if path.exists():
            warnings.warn(f"flashfx: cached kernel {path} does not match its hash (corrupt); rewriting it",
                          stacklevel=2)
        try:
            atomic_write_text(path, source)
        except OSError as error:
            if self._fallback is not None:
                raise
            self._fallback = Path(tempfile.mkdtemp(prefix="flashfx-"))
            warnings.warn(
                f"flashfx: cache directory {self.root} is not writable ({error}); "
                f"using {self._fallback} for this process",
                stacklevel=2,
            )
            return self.store(name, source)
        return path

    @staticmethod
    def _is_intact(path: Path, source: str) -> bool:
        try:
            return path.read_text() == source
        except (OSError, UnicodeDecodeError):
            return False

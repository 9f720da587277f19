"""On-disk cache of generated kernel sources.

Each source is stored under its content hash:

    <cache dir>/kernels/<kernel name>-<sha256[:16]>.py

Writes are atomic (write a temporary file in the same folder, then rename), so a crash never
leaves a half-written kernel behind; files get the mode the umask gives (0644 under umask 022),
so a cache warmed by one user can be read by another. Reading trusts nothing:

    read_cache_file(path)     opens without following a symlink, only a regular file, at most
                              MAX_FILE_BYTES (a FIFO or a link to /dev/zero cannot hang it)
    store(name, source)       a file that is missing, unreadable or does not hash to its name is
                              (re)written; when the cache directory cannot be written the source
                              goes to one private temporary directory per process (removed at exit)

Each damaged entry and the fallback are reported with one warning per process. A temporary
file older than STALE_TEMP_S (left by a killed writer) is removed when its folder is first used.
Under FLASHFX_STRICT_CACHE=1 a source that is not already cached is an error (CacheMissError).
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path

from runtime import knobs

MAX_FILE_BYTES = 8 << 20  # no kernel source or tuned config comes near this
STALE_TEMP_S = 600  # a writer takes milliseconds: a temporary file this old belongs to a killed one
MISSING = "missing"
UNREADABLE = "unreadable"
_MISSING_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG}

_lock = threading.Lock()
_warned: set = set()
_swept: set[Path] = set()
_private: tempfile.TemporaryDirectory | None = None


class CacheMissError(RuntimeError):
    """Raised under FLASHFX_STRICT_CACHE=1 when a kernel or its tuned config is not cached."""


class CacheFileError(OSError):
    """A cache path holds something that is not a readable regular file of a sane size."""


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def warn_once(key, message: str) -> None:
    """warnings.warn(message) the first time this process sees `key`."""
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, stacklevel=3)


# -- reading -----------------------------------------------------------------------------------

def read_cache_file(path: Path, limit: int | None = None) -> str:
    """The text of the regular file `path`: no symlink is followed, no FIFO waited on, and a file
    larger than `limit` bytes (default MAX_FILE_BYTES) raises CacheFileError unread."""
    limit = MAX_FILE_BYTES if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CacheFileError(errno.ELOOP, "a symbolic link", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CacheFileError(errno.EINVAL, "not a regular file", str(path))
        data = handle.read(limit + 1)
    if max(info.st_size, len(data)) > limit:
        raise CacheFileError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data.decode()


def read_problem(error: OSError | UnicodeDecodeError) -> str:
    """How a failed read_cache_file describes the entry: MISSING, or what is wrong with it."""
    if isinstance(error, UnicodeDecodeError):
        return "corrupt (not UTF-8)"
    if isinstance(error, CacheFileError):
        return error.strerror
    if error.errno in _MISSING_ERRNOS:
        return MISSING
    return f"{UNREADABLE} ({error.strerror or error})"


def _problem(path: Path, source: str) -> str | None:
    """None when `path` holds exactly `source`, else MISSING or what is wrong with it."""
    try:
        text = read_cache_file(path)
    except (OSError, UnicodeDecodeError) as error:
        return read_problem(error)
    return None if text == source else "corrupt (its bytes do not match its hash)"


# -- writing -----------------------------------------------------------------------------------

def sweep_stale_temps(directory: Path) -> None:
    """Remove the temporary files older than STALE_TEMP_S in `directory` (once per process)."""
    with _lock:
        if directory in _swept:
            return
        _swept.add(directory)
    cutoff = time.time() - STALE_TEMP_S
    try:
        temps = list(directory.glob(".*.tmp"))
    except OSError:
        return
    for temp in temps:
        try:
            if temp.lstat().st_mtime < cutoff:
                temp.unlink()
        except OSError:
            pass


def write_temp(path: Path, text: str) -> Path:
    """A new, synced temporary file beside `path` holding `text`, mode 0666 less the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    temp = write_temp(path, text)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def private_dir() -> Path:
    """This process's fallback cache directory, created on first use and removed at exit."""
    global _private
    with _lock:
        if _private is None:
            _private = tempfile.TemporaryDirectory(prefix="flashfx-")
        return Path(_private.name)


# -- the store ---------------------------------------------------------------------------------

class SourceCache:
    """Content-addressed store of kernel sources in one directory."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else knobs.cache_dir()

    @property
    def kernel_dir(self) -> Path:
        return self.root / "kernels"

    def path_for(self, name: str, source: str) -> Path:
        return self.kernel_dir / f"{name}-{source_hash(source)}.py"

    def store(self, name: str, source: str) -> Path:
        """Return the path of a verified copy of `source`, writing it if needed."""
        sweep_stale_temps(self.kernel_dir)
        path = self.path_for(name, source)
        problem = _problem(path, source)
        if problem is None:
            return path
        if knobs.strict_cache():
            raise CacheMissError(f"kernel {name} ({path.name}) is {problem} in the cache {self.root} "
                                 "(FLASHFX_STRICT_CACHE=1; run compiler.warmup with this cache first)")
        try:
            atomic_write_text(path, source)
        except OSError as error:
            return self._store_privately(path, source, problem, error)
        if problem != MISSING:
            warn_once(path, f"flashfx: cached kernel {path} was {problem}; rewrote it")
        return path

    def _store_privately(self, path: Path, source: str, problem: str, error: OSError) -> Path:
        """Store `source` in this process's private directory, since the cache cannot take it."""
        private = private_dir() / "kernels" / path.name
        if _problem(private, source) is not None:
            atomic_write_text(private, source)
        entry = "" if problem == MISSING else f"cached kernel {path.name} is {problem} and "
        warn_once(self.root if problem == MISSING else path,
                  f"flashfx: {entry}cache directory {self.root} is not writable ({error}); "
                  f"using {private.parent.parent} for this process")
        return private

"""Autotuning with a persistent, checksummed cache.

A kernel's launch config is tuned once per TuningKey:

    (kernel name, source hash, shape bucket, dtype, device name, torch and triton versions)

and the winner is stored as JSON under <cache dir>/autotune/<key digest>.json:

    {"format": 1, "key": {...}, "config": {...}, "timings_ms": {...}, "checksum": sha256(...)}

Shape buckets: every size a template marks as a length (sequence lengths) is rounded up
to the next power of two, so a new length in the same bucket neither recompiles the
kernel (Triton specialises on dtypes and alignment, not on lengths) nor re-tunes it.

Modes: "default" uses a stored winner if there is one, else the template's heuristic
config, and never benchmarks; "max-autotune" benchmarks the template's candidates on a
miss. Writes are atomic and serialised by a file lock, so concurrent processes warming
one cache never see half a file. A truncated, corrupt or version-mismatched entry is
reported once, removed and rebuilt. With FLASHFX_STRICT_CACHE=1 a miss is an error.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import filelock
import torch
import triton

from runtime import knobs
from runtime.cache import CacheMissError, atomic_write_text

FORMAT_VERSION = 1
MODES = ("default", "max-autotune")


def shape_bucket(size: int) -> int:
    """The power of two >= size (1 for 0 and 1): lengths in one bucket share a tuned config."""
    return 1 if size <= 1 else 1 << (int(size) - 1).bit_length()


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"


@dataclass(frozen=True)
class TuningKey:
    kernel: str
    source_hash: str
    bucket: tuple
    dtype: str
    device: str
    versions: str = f"torch-{torch.__version__}/triton-{triton.__version__}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _key_body(key: TuningKey) -> dict:
    return asdict(key) | {"bucket": list(key.bucket)}


def entry_is_valid(entry) -> bool:
    """Is `entry` (parsed JSON) a complete tuning entry of this format with a matching checksum?"""
    try:
        body = {name: entry[name] for name in ("format", "key", "config", "timings_ms")}
        return entry["format"] == FORMAT_VERSION and entry["checksum"] == _checksum(body)
    except (KeyError, TypeError):
        return False


class Autotuner:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else knobs.cache_dir()
        self._memory: dict[TuningKey, dict] = {}
        self._reported: set[Path] = set()
        self.benchmarks_run = 0

    @property
    def directory(self) -> Path:
        return self.root / "autotune"

    def path_for(self, key: TuningKey) -> Path:
        return self.directory / f"{key.kernel}-{key.digest()}.json"

    # -- lookup ----------------------------------------------------------------------
    def lookup(self, key: TuningKey) -> dict | None:
        if key in self._memory:
            return self._memory[key]
        path = self.path_for(key)
        if not path.exists():
            return None
        config = self._read_entry(path, key)
        if config is not None:
            self._memory[key] = config
        return config

    def _read_entry(self, path: Path, key: TuningKey) -> dict | None:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            entry = None
        if entry_is_valid(entry) and entry["key"] == _key_body(key):
            return entry["config"]
        self._discard(path, "corrupt, truncated or from another version")
        return None

    def _discard(self, path: Path, why: str) -> None:
        if path not in self._reported:
            warnings.warn(f"flashfx: autotune cache entry {path} is {why}; rebuilding it", stacklevel=3)
            self._reported.add(path)
        path.unlink(missing_ok=True)

    # -- choose ----------------------------------------------------------------------
    def config_for(self, key: TuningKey, default: dict, candidates: list[dict],
                   run: Callable[[dict], object], mode: str = "default") -> dict:
        """The config to launch with (see module docstring for modes)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        stored = self.lookup(key)
        if stored is not None:
            return stored
        if mode == "default":
            return default
        if knobs.strict_cache():
            raise CacheMissError(f"no tuned config for {key.kernel} {key.bucket} on {key.device} "
                                 "(FLASHFX_STRICT_CACHE=1; run compiler.warmup first)")
        return self.tune(key, candidates or [default], run)

    def tune(self, key: TuningKey, candidates: list[dict], run: Callable[[dict], object]) -> dict:
        timings = {}
        for config in candidates:
            timing = _time_config(run, config)
            if timing is not None:
                timings[json.dumps(config, sort_keys=True)] = timing
        if not timings:
            raise RuntimeError(f"flashfx: every candidate config of {key.kernel} failed to run")
        self.benchmarks_run += 1
        best = json.loads(min(timings, key=timings.get))
        self.store(key, best, timings)
        return best

    def store(self, key: TuningKey, config: dict, timings: dict) -> None:
        self._memory[key] = config
        body = {"format": FORMAT_VERSION, "key": _key_body(key), "config": config, "timings_ms": timings}
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with filelock.FileLock(str(path) + ".lock", timeout=60):
                atomic_write_text(path, json.dumps(body | {"checksum": _checksum(body)}, indent=1))
        except OSError as error:
            warnings.warn(f"flashfx: cannot persist tuned config to {path} ({error}); keeping it in memory",
                          stacklevel=2)


def _time_config(run: Callable[[dict], object], config: dict) -> float | None:
    """Median milliseconds of run(config), or None if this config cannot run here."""
    try:
        if torch.cuda.is_available():
            from triton.testing import do_bench

            return float(do_bench(lambda: run(config), warmup=5, rep=20, return_mode="median"))
        run(config)
        start = time.perf_counter()
        run(config)
        return (time.perf_counter() - start) * 1e3
    except Exception:  # e.g. out of shared memory for this tile size: not a candidate here
        return None


_default: Autotuner | None = None


def default_autotuner() -> Autotuner:
    """The process-wide tuner for the current cache directory."""
    global _default
    if _default is None or _default.root != knobs.cache_dir():
        _default = Autotuner()
    return _default

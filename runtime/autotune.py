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
one cache never see half a file.

A checksum proves integrity, not validity, so a stored config is also checked against its
template (config_problem): exactly the keys its family declares beside its default_config
(FAMILY_CONFIG_KEYS), each a positive int, block sizes and warp counts powers of two, within
Triton's limits. An entry that is unreadable, truncated, corrupt, from another version or
invalid is a miss, reported once: it is removed if it can be (an unreadable one is left to
its owner), and the template's default config is used ("default") or it is tuned again
("max-autotune"). With FLASHFX_STRICT_CACHE=1 any miss is a CacheMissError naming the kernel
and the shape bucket.
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

from codegen import (attention, attention_backward, attention_decode, long_conv, short_conv, sparse_mlp, ssd_scan,
                     ssd_scan_backward, ssm_scan)
from runtime import knobs
from runtime.cache import (MISSING, UNREADABLE, CacheMissError, atomic_write_text, read_cache_file, read_problem,
                           sweep_stale_temps, warn_once)

FORMAT_VERSION = 1
MODES = ("default", "max-autotune")

# The launch meta-parameters of each family's template, by kernel-name prefix (longest first);
# codegen/<family>.py declares them beside its default_config.
FAMILY_CONFIG_KEYS = (
    ("attention_decode", attention_decode.CONFIG_KEYS),
    ("attention_bwd", attention_backward.CONFIG_KEYS),
    ("attention", attention.CONFIG_KEYS),
    ("long_conv", long_conv.CONFIG_KEYS),
    ("short_conv", short_conv.CONFIG_KEYS),
    ("sparse_mlp", sparse_mlp.CONFIG_KEYS),
    ("ssm_state_update", ssm_scan.STATE_UPDATE_CONFIG_KEYS),
    ("ssm_scan", ssm_scan.CONFIG_KEYS),
    ("ssd_state_update", ssd_scan.STATE_UPDATE_CONFIG_KEYS),
    ("ssd_scan_backward", ssd_scan_backward.BACKWARD_CONFIG_KEYS),
    ("ssd_scan", ssd_scan.CONFIG_KEYS),
)
MAX_META = 1 << 20  # Triton's largest tensor (TRITON_MAX_TENSOR_NUMEL): no meta-parameter goes past it
LARGEST = {"num_warps": 32, "num_stages": 8}


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


def family_config_keys(kernel: str) -> tuple | dict | None:
    """The config keys `kernel`'s family declares (a dict of key tuples for a nested config)."""
    return next((keys for prefix, keys in FAMILY_CONFIG_KEYS if kernel == prefix or kernel.startswith(prefix + "_")),
                None)


def config_problem(kernel: str, config, default: dict | None = None) -> str | None:
    """Why `config` cannot launch `kernel`'s template, or None when it can.

    The keys are those its family declares (else the keys of `default`, when given)."""
    keys = family_config_keys(kernel)
    layout = _layout(keys) if keys is not None else _layout_of(default) if default is not None else None
    return _config_problem(config, layout, "")


def _layout(keys: tuple | dict) -> dict:
    """{name: None for a value, or the layout of a nested part}."""
    return {name: _layout(part) for name, part in keys.items()} if isinstance(keys, dict) else dict.fromkeys(keys)


def _layout_of(config: dict) -> dict:
    return {name: _layout_of(value) if isinstance(value, dict) else None for name, value in config.items()}


def _config_problem(config, layout: dict | None, where: str) -> str | None:
    if not isinstance(config, dict):
        return f"{where.rstrip('.') or 'the config'} is not a mapping"
    if layout is not None and set(config) != set(layout):
        unknown, missing = sorted(set(config) - set(layout)), sorted(set(layout) - set(config))
        return f"{where}keys {unknown} are unknown" if unknown else f"{where}keys {missing} are missing"
    for name, value in config.items():
        nested = layout[name] is not None if layout is not None else isinstance(value, dict)
        inner = layout[name] if layout is not None else None
        problem = (_config_problem(value, inner, f"{where}{name}.") if nested
                   else _value_problem(f"{where}{name}", name, value))
        if problem:
            return problem
    return None


def _value_problem(path: str, name: str, value) -> str | None:
    """Triton's rules for one meta-parameter: tl.arange sizes (BLOCK_*) and warp counts are powers of two."""
    if type(value) is not int or value < 1:
        return f"{path}={value!r} is not a positive integer"
    if (name.startswith("BLOCK_") or name == "num_warps") and value & (value - 1):
        return f"{path}={value} is not a power of two"
    largest = LARGEST.get(name, MAX_META)
    return f"{path}={value} is larger than {largest}" if value > largest else None


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
        self.benchmarks_run = 0

    @property
    def directory(self) -> Path:
        return self.root / "autotune"

    def path_for(self, key: TuningKey) -> Path:
        return self.directory / f"{key.kernel}-{key.digest()}.json"

    # -- lookup ----------------------------------------------------------------------
    def lookup(self, key: TuningKey) -> dict | None:
        """The stored config for `key`; None when there is none or it cannot be used."""
        return self._stored(key)[0]

    def _stored(self, key: TuningKey, default: dict | None = None) -> tuple[dict | None, str | None]:
        """(config, None), or (None, what is wrong with the entry; None when there is none)."""
        if key in self._memory:
            return self._memory[key], None
        sweep_stale_temps(self.directory)
        try:
            text = read_cache_file(self.path_for(key))
        except (OSError, UnicodeDecodeError) as error:
            problem = read_problem(error)
            return None, None if problem == MISSING else problem
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if not entry_is_valid(entry) or entry["key"] != _key_body(key):
            return None, "corrupt, truncated or from another version"
        problem = config_problem(key.kernel, entry["config"], default)
        if problem is not None:
            return None, f"invalid for its template ({problem})"
        self._memory[key] = entry["config"]
        return entry["config"], None

    def _discard(self, path: Path, problem: str, action: str) -> None:
        """Remove an unusable entry if it can be (an unreadable one is not ours); say so once per process."""
        if problem.startswith(UNREADABLE):
            outcome = "left it in place"
        else:
            try:
                path.unlink(missing_ok=True)
                outcome = "removed it"
            except OSError as error:
                outcome = f"could not remove it ({error.strerror or error})"
        warn_once((path, problem), f"flashfx: autotune cache entry {path} is {problem}; {outcome}; {action}")

    # -- choose ----------------------------------------------------------------------
    def config_for(self, key: TuningKey, default: dict, candidates: list[dict],
                   run: Callable[[dict], object], mode: str = "default") -> dict:
        """The config to launch with (see module docstring for modes)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        stored, problem = self._stored(key, default)
        if stored is not None:
            return stored
        path = self.path_for(key)
        if knobs.strict_cache():
            where = f"its entry {path} is {problem}" if problem else f"none in the cache {self.root}"
            raise CacheMissError(f"no tuned config for kernel {key.kernel} at shape bucket {key.bucket} "
                                 f"({key.dtype}, {key.device}): {where} (FLASHFX_STRICT_CACHE=1; run "
                                 "compiler.warmup with mode='max-autotune' for this shape first)")
        if mode == "default":
            if problem:
                self._discard(path, problem, "using the template's default config")
            return default
        if problem:
            self._discard(path, problem, "tuning it again")
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

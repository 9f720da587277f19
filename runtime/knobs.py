"""Typed environment knobs: the one place flashfx reads environment variables.

Every flag is read when asked for, so tests can set it with monkeypatch. True/false
flags follow one convention: "1", "true", "yes", "on" (any case) mean true.

    FLASHFX_CACHE_DIR   where generated kernels and autotune results live
                        (default: $XDG_CACHE_HOME/flashfx or ~/.cache/flashfx)
    FLASHFX_LOG_CODE    print each generated kernel source as it is produced
    FLASHFX_DISABLE     compile() returns the model's own forward (bisecting aid)
    FLASHFX_STRICT_CACHE  a kernel source or tuned config missing from the cache at run
                        time is an error (production: ship a warmed cache)
    FLASHFX_ROLLED      keep the scan loops of transformers' Mamba family and mamba_ssm rolled
                        while flashfx captures (default on; 0 traces them as written)
    TRITON_INTERPRET    run Triton kernels on the CPU interpreter (set to 1 automatically
                        when no CUDA device is present and it is not set explicitly)
"""
from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in _TRUE


def cache_dir() -> Path:
    explicit = os.environ.get("FLASHFX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flashfx"


def log_code() -> bool:
    return env_flag("FLASHFX_LOG_CODE")


def disabled() -> bool:
    return env_flag("FLASHFX_DISABLE")


def strict_cache() -> bool:
    return env_flag("FLASHFX_STRICT_CACHE")


def rolled() -> bool:
    return env_flag("FLASHFX_ROLLED", default=True)


def triton_interpret() -> bool:
    return env_flag("TRITON_INTERPRET")


def triton_interpret_set() -> bool:
    """Has TRITON_INTERPRET been given a value (even a false one)?"""
    return os.environ.get("TRITON_INTERPRET") is not None

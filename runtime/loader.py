"""Import generated kernel modules from the source cache.

Triton's `@jit` reads a kernel's source back with `inspect`, so generated code must live
in a real file: `load_source` stores it in the SourceCache and imports it from there,
once per process per content hash.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from runtime import knobs
from runtime.cache import SourceCache
from runtime.interpret import ensure_mode

_modules: dict[Path, ModuleType] = {}


def load_source(name: str, source: str, cache: SourceCache | None = None) -> tuple[ModuleType, Path]:
    """Store `source` in the cache and return (imported module, its path)."""
    ensure_mode()
    cache = cache or SourceCache()
    path = cache.store(name, source)
    module = _modules.get(path)
    if module is None:
        if knobs.log_code():
            print(f"# flashfx: generated {path}\n{source}", file=sys.stderr)
        module = _import_file(path)
        _modules[path] = module
    return module, path


def _import_file(path: Path) -> ModuleType:
    module_name = f"flashfx_generated.{path.stem.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"flashfx: cannot import generated kernel {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module

"""The scan loops of the libraries users run, kept rolled by default while flashfx captures.

    KNOWN_SCANS    module -> its selective-scan function: the loop over L that Dynamo would unroll
                   transformers' Mamba, FalconMamba, Jamba and Zamba slow paths: mamba_selective_scan
                   mamba_ssm: selective_scan_ref

Each is handed to register_rolled (compiler.rolled) once its module is imported:
at `import compiler` if it already is, else right after it runs (a finder on sys.meta_path wraps
the module's loader), so `import compiler` imports none of them (transformers' modeling modules
take about a second). transformers wraps its function (functools.wraps, and with the `kernels`
package an nn.Module whose forward calls it); the plain function under the wrappers is registered.

A registered call rolls when, at capture, both
    the capture is flashfx's (compiler.compile, or torch.compile(backend="flashfx")): other
        backends trace the library's code as written;
    the user did not opt out: compile(model, rolled=False), options={"rolled": False}, FLASHFX_ROLLED=0.
Dynamo guards every cached graph on its backend, so deciding by backend at capture is consistent.
transformers' parallel scans (use_associative_scan, its default, or use_mambapy) roll too
(register_rolled's algorithm_parameters): flashfx fuses every form into the same kernel, and the
rolled op costs least to capture (benchmarks/compile_time.py: on the CPU the decomposed
associative_scan costs seconds per layer, the loop a few ms per step and layer).
"""
from __future__ import annotations

import importlib.abc
import inspect
import sys
from typing import Callable

import torch

from compiler.backend import Backend, flashfx_backend
from compiler.rolled import register_rolled
from runtime import knobs

SCAN_TAIL = ("A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")
TRANSFORMERS_SCAN = ("mamba_selective_scan", ("hidden_states", "dt") + SCAN_TAIL)
ALGORITHM_PARAMETERS = ("use_mambapy", "use_associative_scan")  # transformers' choice of parallel scan
KNOWN_SCANS = {  # module -> (its scan function, the names of its first parameters, checked before registering)
    "transformers.models.mamba.modeling_mamba": TRANSFORMERS_SCAN,
    "transformers.models.falcon_mamba.modeling_falcon_mamba": TRANSFORMERS_SCAN,
    "transformers.models.jamba.modeling_jamba": TRANSFORMERS_SCAN,
    "transformers.models.zamba.modeling_zamba": TRANSFORMERS_SCAN,
    "mamba_ssm.ops.selective_scan_interface": ("selective_scan_ref", ("u", "delta") + SCAN_TAIL),
}
BACKEND_WRAPPERS = 4  # at most this many wrappers around a backend are looked through
_registered: set[str] = set()


def register_imported() -> None:
    """Register the known scan functions of every module imported so far."""
    for module_name in KNOWN_SCANS.keys() - _registered:
        module = sys.modules.get(module_name)
        if module is not None:
            _registered.add(module_name)
            _register(module, *KNOWN_SCANS[module_name])


def _register(module, name: str, parameters: tuple[str, ...]) -> None:
    """Register module.name if it is the scan we know: another version's function may differ."""
    function = _plain_function(getattr(module, name, None))
    if function is not None and tuple(inspect.signature(function).parameters)[:len(parameters)] == parameters:
        register_rolled(function, when=flashfx_rolls, algorithm_parameters=ALGORITHM_PARAMETERS)


def _plain_function(wrapped) -> Callable | None:
    """The Python function under transformers' wrappers: kernels' Func module (its forward closes over
    the function) and functools.wraps; None when there is none."""
    if isinstance(wrapped, torch.nn.Module):
        wrapped = inspect.getclosurevars(type(wrapped).forward).nonlocals.get("func")
    function = inspect.unwrap(wrapped) if callable(wrapped) else None
    return function if inspect.isfunction(function) else None


@torch._dynamo.assume_constant_result
def flashfx_rolls() -> bool:
    """Is Dynamo capturing for a flashfx backend that keeps known scans rolled? Asked while tracing."""
    if not knobs.rolled():
        return False
    backend, options = _capturing_backend()
    if isinstance(backend, Backend):
        return backend.rolled
    return backend is flashfx_backend and bool(options.get("rolled", True))


def _capturing_backend() -> tuple[object, dict]:
    """The backend of the compilation Dynamo is tracing, under torch.compile's wrappers (debug wrapper,
    _TorchCompileWrapper), and the options torch.compile gave it."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    backend, options = InstructionTranslator.current_tx().output.compiler_fn, {}
    for _ in range(BACKEND_WRAPPERS):
        kwargs = getattr(backend, "kwargs", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("options"), dict):
            options = kwargs["options"]
        inner = getattr(backend, "_torchdynamo_orig_backend", None) or getattr(backend, "compiler_fn", None)
        if inner is None:
            break
        backend = inner
    return backend, options


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds a known module with the other finders, and registers its scan once its loader has run it."""

    def find_spec(self, name, path, target=None):
        if name not in KNOWN_SCANS:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *_: None)(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register_imported()

    def __getattr__(self, name: str):
        """The wrapped loader's other methods (get_source, get_resource_reader...)."""
        return getattr(self.loader, name)


def install() -> None:
    """Register the known scans imported so far, and each of the others when it is imported (idempotent)."""
    register_imported()
    if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())

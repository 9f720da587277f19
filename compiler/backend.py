"""The TorchDynamo backend: Dynamo captures, flashfx compiles each graph it hands over.

Registered as "flashfx" (entry point `torch_dynamo_backends`, and on `import compiler`),
so `torch.compile(model, backend="flashfx")` works. `compiler.compile` uses a Backend of
its own so that each compiled model keeps its own report.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx

from compiler.pipeline import compile_graph
from compiler.report import Report
from runtime.cache import CacheMissError


class Backend:
    def __init__(self, report: Report | None = None, strict: bool = False, mode: str = "default"):
        self.report = report if report is not None else Report()
        self.strict = strict
        self.mode = mode

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        try:
            return compile_graph(gm, example_inputs, self.report, self.mode)
        except CacheMissError:
            raise  # FLASHFX_STRICT_CACHE=1: a missing kernel is an error, never an unfused run
        except Exception as error:
            if self.strict:
                raise
            message = f"graph left to PyTorch: flashfx failed to compile it ({type(error).__name__}: {error})"
            self.report.notes.append(message)
            warnings.warn(f"flashfx: {message}", stacklevel=2)
            return gm.forward


default_backend = Backend()


def flashfx_backend(gm: torch.fx.GraphModule, example_inputs):
    """`torch.compile(model, backend="flashfx")`; its report is `compiler.backend.default_backend.report`."""
    return default_backend(gm, example_inputs)


def register() -> None:
    from torch._dynamo.backends import registry

    if "flashfx" not in registry._COMPILER_FNS:
        registry.register_backend(flashfx_backend, name="flashfx")

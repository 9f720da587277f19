"""The TorchDynamo backend: Dynamo captures, flashfx compiles each graph it hands over, and
Inductor compiles what flashfx did not fuse.

    graph --flashfx passes--> graph calling torch.ops.flashfx.* --Inductor (inductor=True)--> callable

`inductor=None` (the default) uses Inductor for graphs whose tensors are on CUDA and leaves the
rest of a CPU graph to run eagerly (Inductor's C++ backend compiles slowly and Triton's interpreter
runs flashfx's kernels there anyway); True or False forces it. Inductor sees the fused ops as opaque
custom ops, so it neither undoes nor repeats a match: its own attention rewrites see only what
flashfx left.

`mode="reduce-overhead"` (CUDA_GRAPHS) runs what Inductor compiles under its CUDA graphs
(cudagraph trees): the fused ops are built sync-free, and those whose default path must still read
values on the host go through their custom op's twin tagged cudagraph_unsafe, which Inductor runs
between the captured partitions (runtime.dispatch.FusedOp.host_sync_reason; report() lists them).
It needs Inductor: inductor=False is an error.

Registered as "flashfx" (entry point `torch_dynamo_backends`, and on `import compiler`), so
`torch.compile(model, backend="flashfx")` works, and takes `mode` and `options={"inductor": ...,
"rolled": ..., "cudagraphs": ...}` as compile() does (torch.compile takes a mode or options, not both:
`options={"cudagraphs": True}` is mode "reduce-overhead"). `compiler.compile` uses a Backend of its own so that each
compiled model keeps its own report.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx

from compiler.lower import COMPILE_MODES, CUDA_GRAPHS
from compiler.pipeline import compile_graph
from compiler.report import Report
from runtime.cache import CacheMissError


class Backend:
    def __init__(self, report: Report | None = None, strict: bool = False, mode: str = "default",
                 inductor: bool | None = None, rolled: bool = True):
        check_mode(mode, inductor)
        self.report = report if report is not None else Report()
        self.strict = strict
        self.mode = mode
        self.inductor = inductor
        self.rolled = rolled  # read at capture by compiler.known_scans

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        try:
            lowered = compile_graph(gm, example_inputs, self.report, self.mode)
        except CacheMissError:
            raise  # FLASHFX_STRICT_CACHE=1: a missing kernel is an error, never an unfused run
        except Exception as error:
            self._left_to_pytorch("flashfx failed to compile it", error)
            return gm.forward
        if not self._uses_inductor(example_inputs):
            return lowered
        from torch._inductor.compile_fx import compile_fx  # imported on first use: it is slow to import

        try:
            compiled = compile_fx(lowered, example_inputs,
                                  config_patches={"triton.cudagraphs": True} if self.mode == CUDA_GRAPHS else None)
        except Exception as error:
            self._left_to_pytorch("Inductor failed to compile the rest of it", error)
            return lowered
        self.report.inductor_graphs += 1
        return compiled

    def _uses_inductor(self, example_inputs) -> bool:
        if self.inductor is not None:
            return self.inductor
        return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)

    def _left_to_pytorch(self, why: str, error: Exception) -> None:
        if self.strict:
            raise error
        message = f"graph left to PyTorch: {why} ({type(error).__name__}: {error})"
        self.report.notes.append(message)
        warnings.warn(f"flashfx: {message}", stacklevel=3)


def check_mode(mode: str, inductor: bool | None) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == CUDA_GRAPHS and inductor is False:
        raise ValueError(f"mode {CUDA_GRAPHS!r} runs graphs under Inductor's CUDA graphs: "
                         "it needs inductor=None or True")


default_backend = Backend()


def flashfx_backend(gm: torch.fx.GraphModule, example_inputs, mode: str = "default", options: dict | None = None):
    """`torch.compile(model, backend="flashfx", mode=..., options={"inductor": ..., "rolled": ...,
    "cudagraphs": ...})`; the report of calls is `compiler.backend.default_backend.report`. "rolled"
    acts at capture (compiler.known_scans reads it from torch.compile's wrapper), before this is
    called; "cudagraphs": True is mode "reduce-overhead"."""
    options = dict(options or {})
    inductor = options.pop("inductor", None)
    options.pop("rolled", None)
    if options.pop("cudagraphs", False):
        mode = CUDA_GRAPHS
    if options:
        raise ValueError(f"flashfx backend options are 'inductor', 'rolled' and 'cudagraphs' only, "
                         f"got {sorted(options)}")
    check_mode(mode, inductor)
    if mode == "default" and inductor is None:
        return default_backend(gm, example_inputs)
    return Backend(default_backend.report, mode=mode, inductor=inductor)(gm, example_inputs)


def register() -> None:
    from torch._dynamo.backends import registry

    if "flashfx" not in registry._COMPILER_FNS:
        registry.register_backend(flashfx_backend, name="flashfx")

"""flashfx: a model compiler for PyTorch that emits IO-aware Triton kernels.

    import compiler
    cm = compiler.compile(model); y = cm(x); cm.kernels; print(cm.report())
    compiler.warmup(model, [inputs_a, inputs_b])
    torch.compile(model, backend="flashfx")
"""
from compiler.api import CompiledModule, compile, warmup
from compiler.backend import register as _register_backend
from runtime.dispatch import Kernel

_register_backend()

__all__ = ["CompiledModule", "Kernel", "compile", "warmup"]

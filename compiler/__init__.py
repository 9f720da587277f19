"""flashfx: a model compiler for PyTorch that emits IO-aware Triton kernels.

    import compiler
    cm = compiler.compile(model); y = cm(x); cm.kernels; print(cm.report())
    compiler.warmup(model, [inputs_a, inputs_b])
    compiler.export_cache("cache.zip"); compiler.import_cache("cache.zip")
    torch.compile(model, backend="flashfx")
    compiler.register_rolled(scan_fn)   # keep a selective-scan loop rolled under capture
                                        # (transformers' Mamba family and mamba_ssm: by default)
    compiler.sparsify(model, batches, density=0.1)   # DejaVu predictors for a dense model's MLPs
"""
from compiler.api import CompiledModule, compile, warmup
from compiler.backend import register as _register_backend
from compiler.calibrate import SparsifyReport, sparsify
from compiler.known_scans import install as _install_known_scans
from compiler.rolled import register_rolled
from runtime.bundle import export_cache, import_cache
from runtime.dispatch import Kernel

_register_backend()
_install_known_scans()

__all__ = [
    "CompiledModule", "Kernel", "SparsifyReport", "compile", "export_cache", "import_cache",
    "register_rolled", "sparsify", "warmup",
]

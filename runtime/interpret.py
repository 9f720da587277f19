"""Decide once per process whether Triton kernels run compiled or interpreted.

Triton reads TRITON_INTERPRET when its own library and each kernel are *defined*, so the
choice must be made before `import triton`. Importing flashfx (runtime/__init__) does it:
on a machine without CUDA it switches the interpreter on, unless TRITON_INTERPRET is set
explicitly (TRITON_INTERPRET=0 keeps kernels compiled, as runtime.cross_compile needs). On a CUDA machine kernels run
compiled, and a fused op whose tensors are on the CPU falls back to its PyTorch
reference instead (see runtime.dispatch). If Triton was imported earlier with the
interpreter off and there is no CUDA, generated kernels cannot run; fused ops then fall
back with that reason.

Triton's interpreter is not thread-safe (while a kernel runs it patches triton.language and
keeps the program id in shared state), so fused ops hold one process-wide lock around their
launches when kernels are interpreted (`launch_lock`); compiled kernels need none.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

import torch

from runtime import knobs

_late_switch = False
_interpreted: bool | None = None
_INTERPRETER_LOCK = threading.RLock()
_NO_LOCK = contextlib.nullcontext()


def ensure_mode() -> bool:
    """Return True when kernels run on Triton's interpreter (CPU tensors); decided once per process."""
    global _late_switch, _interpreted
    if _interpreted is None:
        if not knobs.triton_interpret_set() and not torch.cuda.is_available():
            _late_switch = "triton" in sys.modules
            os.environ["TRITON_INTERPRET"] = "1"
        _interpreted = knobs.triton_interpret()
    return _interpreted


def kernel_unavailable_reason(device: torch.device) -> str | None:
    """Why a generated kernel cannot run on tensors living on `device` here, or None."""
    interpreted = ensure_mode()
    if interpreted and _late_switch:
        return "Triton was imported before flashfx without TRITON_INTERPRET=1; set it to run kernels on the CPU"
    if (device.type == "cpu") != interpreted or device.type not in ("cpu", "cuda"):
        return f"no Triton kernel for {device.type} tensors in this process"
    return None


def launch_lock():
    """The process-wide lock to hold around kernel launches on Triton's interpreter, or a no-op
    context when kernels run compiled."""
    return _INTERPRETER_LOCK if ensure_mode() else _NO_LOCK

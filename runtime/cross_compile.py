"""Compile generated kernels for a CUDA GPU on a machine that has none.

Triton's interpreter (how kernels run on CPU tensors) accepts programs a GPU compile
rejects: a tile too small for tl.dot, a layout Triton cannot lower, shared memory beyond
the device's limit, registers spilled to local memory. `compile_only` makes those
visible without a GPU:

    with compile_only(capability=90) as compiled:       # H100
        module.launch(q, k, v, out, scale=s)             # tensors on the meta device
    for kernel in compiled: print(kernel.name, kernel.shared_bytes, kernel.spill_bytes)

Inside the block a kernel launch compiles for the target (TTIR -> PTX -> cubin with the
ptxas that ships with Triton) and returns without running; outputs stay unwritten, so
give launches meta tensors. The process must import Triton with TRITON_INTERPRET=0
(runtime.interpret leaves an explicit setting alone).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ir.limits import SHARED_MEMORY_LIMIT
from runtime import knobs

REGISTERS_PER_THREAD_LIMIT = 255


@dataclass
class CompiledKernel:
    """One kernel compiled for the target, and the resources ptxas says it uses."""

    name: str
    constants: dict
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores + spill loads, per thread
    pipelined: bool  # some global loads stream through shared memory (cp.async stages)
    tensor_cores: str  # "wgmma" (Hopper's warp-group MMA), "mma" (warp MMA) or "none"

    def fits(self, capability: int) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_LIMIT.get(capability, SHARED_MEMORY_LIMIT[80])


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: answers with the target, never touches a device."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@contextmanager
def compile_only(capability: int = 90) -> Iterator[list[CompiledKernel]]:
    """Within the block, kernel launches compile for sm_`capability` and are recorded, not run."""
    if knobs.triton_interpret():
        raise RuntimeError("compile_only needs compiled Triton: start the process with TRITON_INTERPRET=0")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled: list[CompiledKernel] = []
    launch = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(_describe(kernel, capability))
        return kernel

    previous_driver = driver._active  # None until first use; `driver.active` would create one and fail
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", capability, 32)))
    JITFunction.run = compile_instead
    try:
        yield compiled
    finally:
        JITFunction.run = launch
        driver.set_active(previous_driver)


def _describe(kernel, capability: int) -> CompiledKernel:
    registers, spills = ptxas_usage(kernel.asm["ptx"], capability)
    names = kernel.src.fn.arg_names
    constants = {names[path[0]]: value for path, value in kernel.src.constants.items()
                 if len(path) == 1 and isinstance(value, (int, str, bool))}
    return CompiledKernel(name=kernel.name, constants=constants, num_warps=kernel.metadata.num_warps,
                          num_stages=kernel.metadata.num_stages, shared_bytes=kernel.metadata.shared,
                          registers=registers, spill_bytes=spills,
                          pipelined="async_copy_global_to_local" in kernel.asm["ttgir"],
                          tensor_cores=_tensor_cores(kernel.asm["ptx"]))


def _tensor_cores(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "none"


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) that ptxas reports for `ptx`."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as workdir:
        source = Path(workdir) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
             str(source), "-o", str(source.with_suffix(".cubin"))],
            capture_output=True, text=True, check=True)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)
    return (int(registers.group(1)) if registers else 0), sum(map(int, spills))

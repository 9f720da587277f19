"""Host cost of calling a fused op: the dispatch path, not the kernel (issue 19 item 6).

    PYTHONPATH=. python benchmarks/host_overhead.py [--calls 2000] [--out results.md]

Each bundled model is compiled and called once; every fused op's calls are recorded with their
operands. Then each op is called `--calls` times three ways:

    module        op(*operands): the FusedOp itself, each generated module's `launch` replaced by a
                  function that returns at once (what the graph called before the custom ops)
    custom op     torch.ops.flashfx.<family>(operands, key), `launch` replaced likewise: what the
                  lowered graph calls now, up to the generated launcher
    + launcher    the custom op with only the Triton kernels themselves replaced (`kernel[grid](...)`
                  returns at once): the generated launcher's Python counted too

and the median microseconds per call are printed as a Markdown table. What the custom op column
holds is flashfx's own work per call: the dispatcher, the registry lookup, the interpreter lock,
the plan lookup (runtime.plans: one key of the operands' shapes, strides, dtypes and devices),
the kernel views (one as_strided each), the output allocation, and the checks on values that stay
per call: attention's compare of a mask folded from module state (a torch.equal) or a chain's
combined bias, the sparse MLP's selection. Long convolutions also compute their filter's spectrum
per call in PyTorch (an FFT: device work on a GPU, counted here because it runs on the CPU).
Triton's own launch cost comes on top on a GPU; the target is at most 10 us beyond it, the
"+ launcher" column. Runs on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

import compiler
from models import dejavu, gpt, hyena, mamba
from runtime import library

MODELS = {"gpt (attention, causal buffer)": gpt.tiny_naive, "gpt (sdpa, gqa)": gpt.tiny_sdpa_gqa,
          "hyena": hyena.tiny, "mamba": mamba.tiny, "dejavu": dejavu.tiny_gathered}


def recorded_calls(build) -> list[tuple[torch.nn.Module, list[torch.Tensor]]]:
    """(op, operands) of each fused-op call one forward of the compiled model makes."""
    model, args = build()
    compiled = compiler.compile(model.eval())
    with torch.no_grad():
        compiled(*args)  # capture, generate, load
        with library.recording() as calls:
            compiled(*args)
    return calls


def median_us(fn, calls: int) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


@contextlib.contextmanager
def no_launch(op):
    """Every kernel of `op` returns at once, with its output argument (the last positional, or out=),
    until the block ends (the generated modules are shared by every op in the process)."""
    def returns_out(*args, **kwargs):
        return kwargs.get("out", args[-1] if args else None)

    with _replaced(op, lambda module: [("launch", returns_out)]):
        yield


@contextlib.contextmanager
def no_kernels(op):
    """Every Triton kernel of `op`'s generated modules returns at once when launched (`kernel[grid](...)`);
    their launchers run as they are."""
    from triton.runtime.jit import KernelInterface  # after flashfx's import has chosen the interpreter or not

    def kernels(module):
        return [(name, _NoKernel()) for name, value in vars(module).items() if isinstance(value, KernelInterface)]

    with _replaced(op, kernels):
        yield


class _NoKernel:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _replaced(op, replacements):
    """Each of `op`'s generated modules with the attributes `replacements(module)` gives, restored afterwards."""
    modules = {id(module): module for module, _ in op._loaded.values()}.values()
    saved = [(module, name, getattr(module, name)) for module in modules for name, _ in replacements(module)]
    for module in modules:
        for name, value in replacements(module):
            setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def rows(calls: int) -> list[tuple[str, str, float, float, float]]:
    table = []
    for name, build in MODELS.items():
        seen = set()
        for op, operands in recorded_calls(build):
            if op.label in seen:
                continue
            seen.add(op.label)
            custom_op = op.custom_op  # the OpOverload the lowered graph holds
            with torch.no_grad():
                with no_launch(op):
                    module = median_us(lambda: op(*operands), calls)
                    custom = median_us(lambda: custom_op(operands, op.key), calls)
                with no_kernels(op):
                    launcher = median_us(lambda: custom_op(operands, op.key), calls)
            table.append((name, f"{op.library_op} ({op.label})", module, custom, launcher))
    return table


def markdown(table) -> str:
    lines = ["| model | op | module (us) | custom op (us) | + launcher (us) |", "|---|---|---|---|---|"]
    lines += [f"| {model} | {op} | {module:.1f} | {custom:.1f} | {launcher:.1f} |"
              for model, op, module, custom, launcher in table]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    options = parser.parse_args()
    text = markdown(rows(options.calls))
    print(text)
    if options.out:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Host cost of calling a fused op: the dispatch path, not the kernel (issue 19 item 6).

    PYTHONPATH=. python benchmarks/host_overhead.py [--calls 2000] [--out results.md]

Each bundled model is compiled and called once; every fused op's calls are recorded with their
operands. Then, with each generated kernel's `launch` replaced by a function that returns at once,
each op is called `--calls` times two ways:

    module        op(*operands): the FusedOp itself (what the graph called before the custom ops)
    custom op     torch.ops.flashfx.<family>(operands, key): what the lowered graph calls now

and the median microseconds per call are printed as a Markdown table, with the difference. What
remains is flashfx's own work per call: the dispatcher, the registry lookup, the interpreter lock,
layout views, the fallback checks, the tuned-config lookup, the output allocation, and where the op
checks module state folded in at compile time, that check (a torch.equal over the mask). Triton's
own launch cost comes on top on a GPU; the target is at most 10 us beyond it. Runs on the CPU.
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
    modules = {id(module): module for module, _ in op._loaded.values()}.values()
    launches = [(module, module.launch) for module in modules]
    for module, _ in launches:
        module.launch = lambda *args, **kwargs: kwargs.get("out", args[-1] if args else None)
    try:
        yield
    finally:
        for module, launch in launches:
            module.launch = launch


def rows(calls: int) -> list[tuple[str, str, float, float]]:
    table = []
    for name, build in MODELS.items():
        seen = set()
        for op, operands in recorded_calls(build):
            if op.label in seen:
                continue
            seen.add(op.label)
            with no_launch(op), torch.no_grad():
                module = median_us(lambda: op(*operands), calls)
                custom = median_us(lambda: op.custom_op(operands, op.key), calls)
            table.append((name, f"{op.library_op} ({op.label})", module, custom))
    return table


def markdown(table) -> str:
    lines = ["| model | op | module (us) | custom op (us) | difference (us) |", "|---|---|---|---|---|"]
    lines += [f"| {model} | {op} | {module:.1f} | {custom:.1f} | {custom - module:+.1f} |"
              for model, op, module, custom in table]
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

"""Host cost of calling a fused op: the dispatch path, not the kernel (issue 19 item 6).

    PYTHONPATH=. python benchmarks/host_overhead.py [--calls 2000] [--out results.md]

Each bundled model is compiled and called once; every fused op's calls are recorded with their
operands. Then each op is called as the lowered graph calls it, torch.ops.flashfx.<family>(operands,
key), `--calls` times in each of 15 rounds, with every Triton kernel replaced by a function that
returns at once (`kernel[grid](...)`, however it is reached): what is timed is flashfx's own work
per call, beyond Triton's launch. That is the dispatcher and the Autograd kernel, the signature
check that finds the op's latest fast path (or the plan's key and lookup, runtime.plans), the fast
path's replay as one call (allocations and kernel arguments, runtime.bound.FastCall) or the full
forward, and the checks on values that stay per call: attention's compare of a mask folded from
module state (a torch.equal, of int64 words where the layout allows) or a chain's combined bias,
the sparse MLP's selection and W2's column-major copy. A long convolution's filter spectrum is a
kernel of its own (stubbed like the rest), but for circular and fp64 filters, whose torch.fft runs
(and is counted) here.

The table gives the fastest round's mean (the least disturbed by other work on the machine, as
timeit advises) and the median round's. Two reference rows calibrate the machine: a custom op that
returns its input (the dispatcher's floor, which any torch.library op pays) and one torch.empty.
The target is at most 10 us beyond Triton's launch. Runs on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import timeit
from pathlib import Path

import torch

import compiler
from benchmarks.common import Row, run_configs
from models import dejavu, gpt, hyena, mamba, mamba2
from runtime import library

CPU = torch.device("cpu")
MODELS = {"gpt (attention, causal buffer)": gpt.tiny_naive, "gpt (sdpa, gqa)": gpt.tiny_sdpa_gqa,
          "hyena": hyena.tiny, "mamba": mamba.tiny, "mamba2": mamba2.tiny, "mamba2 decode step": mamba2.step_tiny,
          "dejavu": dejavu.tiny_gathered}


def recorded_calls(build, device: torch.device = CPU) -> list[tuple[torch.nn.Module, list[torch.Tensor]]]:
    """(op, operands) of each fused-op call one forward of the compiled model makes on `device`."""
    model, args = build()
    model, args = model.to(device), [arg.to(device) for arg in args]
    compiled = compiler.compile(model.eval())
    with torch.no_grad():
        compiled(*args)  # capture, generate, load
        with library.recording() as calls:
            compiled(*args)
    return calls


def timed_us(fn, calls: int) -> tuple[float, float]:
    """(fastest, median) round's mean microseconds per call of fn, over 15 rounds of `calls` calls."""
    rounds = sorted(timeit.repeat(fn, number=calls, repeat=15))
    return rounds[0] / calls * 1e6, statistics.median(rounds) / calls * 1e6


@contextlib.contextmanager
def no_kernels():
    """Every Triton kernel returns at once when launched (`kernel[grid](...)`, however the launcher or a
    bound launch reached it) until the block ends; the launchers run as they are."""
    from triton.runtime.jit import KernelInterface  # after flashfx's import has chosen the interpreter or not

    launch = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda kernel, grid: _returns_none
    try:
        yield
    finally:
        KernelInterface.__getitem__ = launch


def _returns_none(*args, **kwargs):
    return None


_REFERENCE = torch.library.Library("host_overhead", "FRAGMENT")


def floor_us(calls: int, device: torch.device = CPU) -> tuple[float, float]:
    """timed_us of a custom op registered as flashfx's are, returning the first of its three operands:
    the dispatcher's floor, which any torch.library op pays."""
    name = "identity"
    if not hasattr(torch.ops.host_overhead, name):
        _REFERENCE.define(f"{name}(Tensor[] operands, str op) -> (Tensor, Tensor[] residuals)")
        _REFERENCE.impl(name, lambda keyset, operands, op: (operands[0], []), "Autograd", with_keyset=True)
    identity, operands = getattr(torch.ops.host_overhead, name).default, [torch.empty(2, 4, 64, 16, device=device)] * 3
    with torch.no_grad():
        return timed_us(lambda: identity(operands, ""), calls)


def rows(calls: int) -> list[tuple[str, str, float, float]]:
    """(model, op, fastest round's us, median round's us) per fused op, then the reference rows."""
    table = []
    for name, build in MODELS.items():
        seen = set()
        for op, operands in recorded_calls(build):
            if op.label in seen:
                continue
            seen.add(op.label)
            custom_op = op.custom_op  # the OpOverload the lowered graph holds
            with torch.no_grad(), no_kernels():
                table.append((name, f"{op.library_op} ({op.label})",
                              *timed_us(lambda: custom_op(operands, op.key), calls)))
    table.append(("reference", "custom op returning its input", *floor_us(calls)))
    table.append(("reference", "torch.empty", *timed_us(lambda: torch.empty((2, 4, 64, 16)), calls)))
    return table


# The GPU check's suite (benchmarks/gpu_check.py): one op of each family, on the check's device.
GRID = [("gpt (sdpa, gqa)", "attention"), ("gpt (attention, causal buffer)", "attention"), ("hyena", "short_conv"),
        ("hyena", "long_conv"), ("mamba", "ssm_scan"), ("mamba2", "ssd_scan"), ("mamba2 decode step", "ssd_scan"),
        ("dejavu", "sparse_mlp")]
TARGET_MS = 0.010  # issue 19: at most 10 us beyond Triton's own launch


def grid(quick: bool, headline: bool = False) -> list[dict]:
    return [{"model": model, "op": family} for model, family in GRID]


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    """A row per GRID entry: ours_ms is flashfx's host time per call beyond Triton's launch (kernels
    stubbed); the peers are the floor any custom op pays (an identity op) and, on a GPU, the time per
    call with the kernels launched (host-bound at these tiny sizes: flashfx plus Triton's launch)."""
    calls = 20 if quick else 300
    recorded = functools.cache(lambda model: recorded_calls(MODELS[model], device))
    floor, _ = floor_us(calls, device)

    def measure(config: dict) -> Row:
        op, operands = next(call for call in recorded(config["model"]) if call[0].pattern == config["op"])
        with torch.no_grad():
            with no_kernels():
                ours, _ = timed_us(lambda: op.custom_op(operands, op.key), calls)
            launched = _launched_us(op, operands, calls) if device.type == "cuda" else None
        return Row("host_overhead", config, ours / 1e3,
                   {"identity custom op": floor / 1e3, "with Triton's launch": launched and launched / 1e3},
                   notes=f"host ms per call; target: ours <= {TARGET_MS} ms")

    return run_configs("host_overhead", grid(quick, headline), measure)


def _launched_us(op, operands, calls: int) -> float:
    """The fastest of 15 rounds of `calls` launches, the device synchronised after each round."""
    def round_of_calls():
        for _ in range(calls):
            op.custom_op(operands, op.key)
        torch.cuda.synchronize()

    round_of_calls()
    return min(timeit.repeat(round_of_calls, number=1, repeat=15)) / calls * 1e6


def markdown(table) -> str:
    lines = ["| model | op | fastest round (us) | median round (us) |", "|---|---|---|---|"]
    lines += [f"| {model} | {op} | {fastest:.1f} | {median:.1f} |" for model, op, fastest, median in table]
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

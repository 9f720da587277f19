"""Shared benchmark plumbing: timing, hardware ceilings, the run's time budget, result records and writers.

Timing uses triton.testing.do_bench (median of many runs, L2 flushed) on CUDA and a plain
wall-clock loop on the CPU (only for `--quick` smoke runs of the harness itself). Peers that
take seconds per call (Python loops over a sequence) use `wall_ms`, which calls them twice.

Time budget: `Budget` shares a call's seconds among its parts (GPU tests, suites) in proportion
to their estimates. run_all and gpu_check run each suite through `run_suite`, which gives it a
deadline (`set_time_budget`) and a hook that writes each finished row out (`set_row_hook`);
`run_configs` measures configs until the deadline passes and reports the rest as rows that did
not run, so a call on the GPU machine ends inside its limit, and a call killed at its limit
still leaves every finished row behind. `run_pytest` runs the GPU tests in a subprocess that is
stopped, xdist workers and all, when its share of the budget is spent.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]  # the repository: pytest runs from here
_deadline = math.inf  # time.monotonic() after which run_configs starts no new config
_row_hook: Callable[[Row], None] | None = None  # called with each row run_configs finishes


@dataclass
class Row:
    """One measured configuration: our time and each peer's, in milliseconds."""

    suite: str
    config: dict
    ours_ms: float | None
    peers_ms: dict[str, float | None] = field(default_factory=dict)
    work: dict = field(default_factory=dict)  # flops and/or bytes, for rates
    notes: str = ""

    def ratios(self) -> dict[str, float | None]:
        """Peer time / our time: above 1 means we are faster."""
        if not self.ours_ms:
            return {name: None for name in self.peers_ms}
        return {name: (peer / self.ours_ms if peer else None) for name, peer in self.peers_ms.items()}


# -- timing ----------------------------------------------------------------------------------
def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, *, warmup: int = 25, rep: int = 100) -> float | None:
    """Median milliseconds per call of `fn()`, or None when it raises (peer not available)."""
    try:
        if torch.cuda.is_available():
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    except Exception:  # a peer that cannot run this config is reported as missing
        return None


def wall_ms(fn, *, calls: int = 1) -> float | None:
    """Milliseconds per call of `fn()` after one warm call, the mean of `calls` synchronised calls;
    None when it raises. For peers that take seconds per call, where do_bench would make 8 or more."""
    try:
        fn()
        _synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _synchronize()
        return (time.perf_counter() - start) * 1e3 / calls
    except Exception:
        return None


def saved_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph (any device, the
    meta device included), less the storages of the tensors in `exclude` (module state)."""
    excluded = {t.untyped_storage()._cdata for t in exclude}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def against_eager_and_inductor(compiled, factory: Callable[[], torch.nn.Module], args, device) -> tuple:
    """(ms of `compiled`, {"eager": ms, "torch.compile": ms (CUDA only)}) of factory()'s module called
    on args, without autograd."""
    peers = {"eager": factory()}
    if device.type == "cuda":
        peers["torch.compile"] = torch.compile(factory())
    with torch.no_grad():
        ours = bench_ms(lambda: compiled(*args))
        return ours, {name: bench_ms(lambda fn=fn: fn(*args)) for name, fn in peers.items()}


def first_call_s(fn) -> float | None:
    """Seconds taken by `fn()`'s first call (capture and compilation, for a compiled module);
    None when it raises."""
    try:
        start = time.perf_counter()
        fn()
        _synchronize()
        return time.perf_counter() - start
    except Exception:
        return None


# -- ceilings --------------------------------------------------------------------------------
@triton.jit
def _exp2_chain(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """ITERS dependent exp2s per element, x <- -exp2(x) / 2 (stays in [-1/2, -1/4])."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = offsets.to(tl.float32) * -1e-9
    for _ in range(ITERS):
        x = tl.exp2(x) * -0.5
    tl.store(out_ptr + offsets, x)


def _exp2_per_s() -> float | None:
    """tl.exp2 evaluations per second over the whole GPU (2^22 elements, 256 each); None if the
    kernel fails."""
    out = torch.empty(1 << 22, device="cuda", dtype=torch.float32)
    iters, block = 256, 1024
    ms = bench_ms(lambda: _exp2_chain[(out.numel() // block,)](out, ITERS=iters, BLOCK=block))
    return out.numel() * iters / (ms * 1e-3) if ms else None


@functools.cache
def measure_ceilings() -> dict[str, float]:
    """Measured once per process: bf16 matmul TFLOP/s (8192^3), device-to-device copy TB/s (1 GiB,
    bytes read + written) and the tl.exp2 rate (evaluations per second)."""
    if not torch.cuda.is_available():
        return {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_ms = bench_ms(lambda: a @ b)
    source = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    copy_ms = bench_ms(lambda: target.copy_(source))
    return {
        "matmul_tflops": 2 * 8192**3 / (matmul_ms * 1e-3) / 1e12,
        "copy_tbps": 2 * source.numel() * 2 / (copy_ms * 1e-3) / 1e12,
        "exp2_per_s": _exp2_per_s(),
    }


def memory_floor_ms(nbytes: int) -> float | None:
    """Milliseconds to move `nbytes` at the measured copy bandwidth; None without a GPU."""
    ceilings = measure_ceilings()
    return nbytes / (ceilings["copy_tbps"] * 1e12) * 1e3 if ceilings else None


def exp2_floor_ms(count: int) -> float | None:
    """Milliseconds for `count` exponentials at the measured tl.exp2 rate; None without a GPU."""
    rate = measure_ceilings().get("exp2_per_s")
    return count / rate * 1e3 if rate else None


# -- time budget -----------------------------------------------------------------------------
def set_time_budget(seconds: float | None) -> None:
    """Configs that would start more than `seconds` from now are not run (None: no limit)."""
    global _deadline
    _deadline = math.inf if seconds is None else time.monotonic() + seconds


def set_row_hook(hook: Callable[[Row], None] | None) -> None:
    """Call hook(row) for each row run_configs finishes (run_all writes the results with it)."""
    global _row_hook
    _row_hook = hook


def seconds_left() -> float:
    return _deadline - time.monotonic()


class Budget:
    """Shares `total_s` among the parts still to run, in proportion to their estimated seconds;
    time a part leaves unused passes to the parts after it."""

    def __init__(self, total_s: float | None, estimates_s: dict[str, float]):
        self.end = None if total_s is None else time.monotonic() + total_s
        self.estimates_s = dict(estimates_s)  # the parts still to run

    def share(self, part: str) -> float | None:
        """Seconds for `part`, which runs now; None without a budget."""
        remaining = sum(self.estimates_s.values())
        estimate = self.estimates_s.pop(part)
        if self.end is None:
            return None
        return max(0.0, self.end - time.monotonic()) * estimate / remaining


def _finished(rows: list[Row], row: Row) -> None:
    rows.append(row)
    if _row_hook is not None:
        _row_hook(row)


def run_configs(suite: str, configs: Iterable[dict], measure: Callable[[dict], Row]) -> list[Row]:
    """measure(config) for each config while the time budget lasts, then a row per config that did
    not run. A config that raises becomes a row saying why, so one failure costs one row of a GPU
    run, not the run. Dynamo's cache and the CUDA allocator's are emptied between configs."""
    rows = []
    for config in configs:
        if seconds_left() <= 0:
            _finished(rows, Row(suite, config, None, notes="not run: the suite's time budget was spent"))
            continue
        try:
            row = measure(config)
        except Exception as error:  # recorded in the row, the run goes on
            row = Row(suite, config, None, notes=f"failed: {type(error).__name__}: {error}"[:300])
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _finished(rows, row)
    return rows


def run_suite(name: str, run: Callable[[], list[Row]], payload: dict, write: Callable[[], None],
              seconds: float | None) -> None:
    """run() with `seconds` of budget into payload["suites"][name], calling write() after each
    row; a suite that raises keeps the rows it finished and gets a row saying why it stopped."""
    finished = payload["suites"][name] = []

    def write_row(row: Row) -> None:
        finished.extend(rows_payload([row]))
        write()

    set_time_budget(seconds)
    set_row_hook(write_row)
    try:
        payload["suites"][name] = rows_payload(run())
    except Exception as error:  # recorded in the results, the next suite runs
        write_row(Row(name, {}, None, notes=f"suite stopped: {type(error).__name__}: {error}"[:300]))
    finally:
        set_row_hook(None)


def run_pytest(args: list[str], log: Path, timeout_s: float | None) -> dict:
    """`python -m pytest *args` from the repository root, its output in `log`, stopped with its
    xdist workers (one process group) after timeout_s: {"returncode", "summary": pytest's last
    line} or {"timed_out_s"}."""
    command = [sys.executable, "-m", "pytest", *args]
    with log.open("w") as stream:
        process = subprocess.Popen(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, process_group=0,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {"timed_out_s": round(timeout_s)}
    return {"returncode": returncode, "summary": (log.read_text().strip().splitlines() or [""])[-1]}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def rows_payload(rows: list[Row]) -> list[dict]:
    return [dict(asdict(row), ratios=row.ratios()) for row in rows]

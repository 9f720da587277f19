"""GPU tests, then benchmark suites, written under $OUT; also merges the results of several calls.
For the five-minute overview (a test subset and each family's headline configs in one call), see
benchmarks/gpu_check.py; this runs the full suites, one or a few per call.

    PYTHONPATH=. python benchmarks/run_all.py                 # everything, results in $OUT (~29 min: see below)
    PYTHONPATH=. python benchmarks/run_all.py --quick --out d  # smoke run of the harness (CPU ok)
    PYTHONPATH=. python benchmarks/run_all.py --suites ssm_scan,end_to_end --skip-tests --budget-s 500
    PYTHONPATH=. python benchmarks/run_all.py --merge dir1 dir2 ... --out d   # one report from several calls

Writes results.json (every row, peers, ratios, ceilings, test summary, seconds per part),
results.md (tables) and PNG plots, rewritten after every row, so a call killed at its limit
keeps what it finished. Commit them under benchmarks/results/<date>-<device>/.

Time on the H100 machine. These are estimates, not measurements (no full run has been timed
yet; results.json's "elapsed_s" records the real figures, so correct ESTIMATE_S from them).
Compiling dominates: a torch.compile of a small graph costs ~5-10 s, of a 12-layer model
~12 s (the anchors' GPT-2 small: 11.7 s), and capturing an unrolled scan loop ~20 steps/s on
the 2-core CPU machine (L 256: 13 s, L 512: 24 s), perhaps twice that on the GPU machine.

    part              est.   where the time goes
    GPU tests         300 s  66 tests; the every-autotuning-candidate sweeps JIT-compile dozens
                             of kernels; the Mamba-size scan test unrolls L 2048 (~1 min)
    attention         420 s  24 configs x (flex + inductor-naive compiles ~12 s, 6 timings)
    attention_decode   60 s  10 configs, SDPA peers need no compile
    long_conv         380 s  18 convs x a torch.compile peer, 4 real-size models x (ours, Inductor)
    warm_start        150 s  5 fresh processes each for GPT-2 small and Mamba-130M (eager's
                             first call of the scan loop at L 2048: ~6 s)
    ssm_scan          240 s  unrolled capture at L 256 and 512 (~20 s), assoc-compile at 3 lengths
                             (~15 s each); the Mamba-130M row: eager 2 calls x ~6 s, Inductor on
                             the associative form ~60-120 s
    ssd_scan          110 s  4 chunk scans x a torch.compile (~8 s) + eager, the decode step, the
                             scan's fwd+bwd (a torch.compile of both ~12 s)
    sparse_mlp        120 s  36 MLP configs x ~2 s, 2 OPT-6.7B layers x a torch.compile
    end_to_end        300 s  10 models x (ours ~12 s + torch.compile ~15 s to first call); Mamba's
                             eager loop one call of ~6-12 s
    compile_time      300 s  HF Mamba's first call at 2 and 24 layers, L 512 and 2048, scan rolled and
                             as written (the unrolled loop only up to 4096 layer-steps, ~20 s)
    attention_training 480 s 48 attention rows x (flex fwd+bwd compile ~6 s, 5 timings), 2 GPT-2
                             small training steps x (ours, torch.compile: ~25 s to first call)
    conv_training     150 s  long and short conv fwd+bwd, 3 x a torch.compile; a Hyena-150M training
                             step x (ours with Inductor, torch.compile), ~40 s of compiling each
    total            ~50 min, plus ~1-2 min to start a machine

That is over four times one call's 10-minute limit and more than a session's 15 minutes of device time,
so the full set does not fit one call. Run it as eight calls (each ~5-8 min, the budget a
safety net; each call's $OUT holds at most 6 files), then merge them on any machine:

    1. run_all.py --suites attention_decode,warm_start --budget-s 500       # + GPU tests, ~510 s
    2. run_all.py --suites attention --skip-tests --budget-s 500            # ~420 s
    3. run_all.py --suites long_conv,sparse_mlp --skip-tests --budget-s 500 # ~500 s
    4. run_all.py --suites ssm_scan,ssd_scan --skip-tests --budget-s 500    # ~330 s
    5. run_all.py --suites compile_time --skip-tests --budget-s 500         # ~300 s
    6. run_all.py --suites attention_training --skip-tests --budget-s 500   # ~480 s
    7. run_all.py --suites conv_training --skip-tests --budget-s 500        # ~150 s
    8. run_all.py --suites end_to_end --skip-tests --budget-s 500           # ~300 s
    run_all.py --merge <files_at of 1..8> --out benchmarks/results/<date>-h100

A session working on one issue runs only the suites it needs (issue 3: attention,
attention_decode and end_to_end; issue 4: long_conv; issue 5: ssm_scan; issue 6: sparse_mlp;
issue 7: warm_start; issue 14: attention_training; issue 15: conv_training and ssm_scan; issue
19's item 8: compile_time), with --skip-tests unless it changed kernels.

--budget-s B shares B seconds among the tests and suites in proportion to their estimates (time
a part leaves unused passes to the next); a suite starts no config past its share and reports
the rest as not run, and the GPU tests are stopped at theirs (the log keeps their progress), so
one call with everything and --budget-s 500 gives a partial overview of every suite. A config
in progress finishes, so keep B ~100 s under the call's 600 s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import (attention, attention_decode, attention_training, compile_time, conv_training, end_to_end,
                        long_conv, report, sparse_mlp, ssd_scan,
                        ssm_scan, warm_start)
from benchmarks.common import Budget, device_name, measure_ceilings, run_pytest, run_suite, write_json

SUITES = {"attention": attention.run, "attention_decode": attention_decode.run, "warm_start": warm_start.run,
          "long_conv": long_conv.run, "ssm_scan": ssm_scan.run, "ssd_scan": ssd_scan.run,
          "sparse_mlp": sparse_mlp.run, "end_to_end": end_to_end.run, "compile_time": compile_time.run,
          "attention_training": attention_training.run, "conv_training": conv_training.run}
TESTS = "GPU tests"
ESTIMATE_S = {TESTS: 300, "attention": 420, "attention_decode": 60, "warm_start": 150, "long_conv": 380,
              "ssm_scan": 240, "ssd_scan": 110, "sparse_mlp": 120, "end_to_end": 300, "compile_time": 300,
              "attention_training": 480, "conv_training": 150}  # full size, H100, see above


def run_gpu_tests(out: Path, timeout_s: float | None) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    return run_pytest(["-q", "-m", "gpu", "tests"], out / "gpu_tests.txt", timeout_s)


def write_results(out: Path, payload: dict, plots: bool = True) -> None:
    write_json(out / "results.json", payload)
    (out / "results.md").write_text(report.markdown(payload))
    if plots:
        report.plots(payload, out)


def measure(options, suites: list[str], out: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = ([] if options.skip_tests else [TESTS]) + suites
    budget = Budget(options.budget_s, {part: ESTIMATE_S[part] for part in parts})
    payload = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "torch": torch.__version__,
        "ceilings": measure_ceilings(),
        "gpu_tests": {"skipped": "--skip-tests"},
        "elapsed_s": {},
        "suites": {},
    }
    if not options.skip_tests:
        start = time.monotonic()
        payload["gpu_tests"] = run_gpu_tests(out, budget.share(TESTS))
        payload["elapsed_s"][TESTS] = round(time.monotonic() - start, 1)
        write_results(out, payload)
    for name in suites:
        start = time.monotonic()
        run_suite(name, lambda: SUITES[name](options.quick, device), payload,
                  lambda: write_results(out, payload, plots=False), budget.share(name))
        payload["elapsed_s"][name] = round(time.monotonic() - start, 1)
        write_results(out, payload)


def merge(folders: list[str]) -> dict:
    """One payload from several calls' results.json: their suites and times, the first call's
    ceilings, and the GPU tests of the call that ran them."""
    payloads = [json.loads((Path(folder) / "results.json").read_text()) for folder in folders]
    merged = {**payloads[0], "suites": {}, "elapsed_s": {}}
    for payload in payloads:
        merged["suites"].update(payload["suites"])
        merged["elapsed_s"].update(payload.get("elapsed_s", {}))
        if "skipped" not in payload["gpu_tests"]:
            merged["gpu_tests"] = payload["gpu_tests"]
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the harness itself")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated subset of " + ",".join(SUITES))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--budget-s", type=float, help="seconds for the tests and suites together (default: no limit)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="merge these calls' results into --out; run nothing")
    options = parser.parse_args()
    suites = [name for name in options.suites.split(",") if name]
    if set(suites) - set(SUITES):
        parser.error(f"unknown suites {sorted(set(suites) - set(SUITES))}; known: {', '.join(SUITES)}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    if options.merge:
        write_results(out, merge(options.merge))
    else:
        measure(options, suites, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

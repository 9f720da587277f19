"""One call on the GPU machine: GPU tests, then every benchmark suite, written under $OUT.

    PYTHONPATH=. python benchmarks/run_all.py                 # full run, results in $OUT
    PYTHONPATH=. python benchmarks/run_all.py --quick --out d  # smoke run of the harness (CPU ok)

Writes results.json (every row, peers, ratios, ceilings, test summary), results.md (tables)
and one PNG per suite. Commit them under benchmarks/results/<date>-<device>/.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import attention, attention_decode, long_conv, report, warm_start
from benchmarks.common import device_name, measure_ceilings, rows_payload, write_json

SUITES = {"attention": attention.run, "attention_decode": attention_decode.run, "warm_start": warm_start.run,
          "long_conv": long_conv.run}


def run_gpu_tests(out: Path) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."})
    (out / "gpu_tests.txt").write_text(result.stdout + result.stderr)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": result.returncode, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the harness itself")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated subset of " + ",".join(SUITES))
    parser.add_argument("--skip-tests", action="store_true")
    options = parser.parse_args()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "torch": torch.__version__,
        "ceilings": measure_ceilings(),
        "gpu_tests": {"skipped": "--skip-tests"} if options.skip_tests else run_gpu_tests(out),
        "suites": {},
    }
    for name in options.suites.split(","):
        payload["suites"][name] = rows_payload(SUITES[name](options.quick, device))
    write_json(out / "results.json", payload)
    (out / "results.md").write_text(report.markdown(payload))
    report.plots(payload, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

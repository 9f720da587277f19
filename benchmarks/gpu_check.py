"""The five-minute GPU check (issue 17): each family's kernels tested on the GPU, then each family's
headline configs against the peers measured in the same run, and one summary table.

    make gpu-check                                                   # on the GPU machine, into $OUT
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR [--budget-s 270]
    PYTHONPATH=. python benchmarks/gpu_check.py --quick --out /tmp/x  # the same path, CPU interpreter

Plan, in priority order, so that a run cut short has done what matters most:

    1. GPU tests   GPU_TESTS, 44 of the 96 `gpu` tests: each family's kernel at real sizes, awkward
                   sizes, dtypes and layouts (the backward kernels too), every autotuning candidate
                   of the attention (head dim 128; the backward's dkdv kernel), long-conv,
                   short-conv and sparse-MLP kernels, compile() on real-size
                   modules, eight threads sharing one compiled model, and a decode step under
                   CUDA graphs (mode "reduce-overhead"); pytest-xdist, one
                   worker per core (16), so the JIT compiles overlap
    2. ceilings    bf16 matmul, device-to-device copy, tl.exp2 rate (benchmarks.common)
    3. headline    each suite's run(..., headline=True), reusing the suites' measurements:
                   attention 4 (head dim 64 and 128, causal and not, L 4k; SDPA flash, cuDNN,
                   efficient, FlexAttention), decode 3 (one a tree mask), long conv 2 + short 1,
                   scan 2 (the scan at L 2048 and the decode step), SSD 3 (Mamba2-130M L 2k,
                   Mamba2-780M L 8k, the decode step), sparse MLP 3 (one gated), GPT-2 small;
                   then each family's host time per call beyond Triton's launch (issue 19's 10 us
                   target) and with the kernels launched, on the bundled tiny models
    4. training    fwd+bwd, suites of their own: attention fwd+bwd and bwd alone (head dim 128, L 4k,
                   causal; SDPA flash, cuDNN, efficient, FlexAttention) and a GPT-2 small training
                   step against torch.compile; the long convolution's fwd+bwd (conv_training's
                   headline); the selective scan's fwd+bwd at Mamba-130M's size; the SSD's fwd+bwd
                   at Mamba2-130M's

Seconds on an H100/H200. These are estimates (no run has been timed yet): summary.json's
"elapsed_s" records the real figures, so correct ESTIMATE_S from them. torch.compile peers cost
5-15 s of compile each, so the headline configs keep few of them (one per config at most).

    part              est.  where the time goes
    GPU tests          80   16 workers start (import torch, collect 9 files) ~15 s; the longest
                            test compiles 32 attention candidates (~1.5 s each) while the other
                            29 share the remaining workers
    ceilings            5   an 8192^3 matmul, a 1 GiB copy, an exp2 chain, each do_bench'ed
    attention          50   4 x (ours: capture + JIT ~3 s; flex: a torch.compile ~6 s; 5 timings)
    attention_decode   10   3 x 5 timings; SDPA's backends need no compile
    long_conv          35   3 x (ours ~3 s, a torch.compile ~6 s, 3 timings)
    ssm_scan           30   scan L 2048: assoc-compile ~15 s, the eager loop ~8 calls x 0.25 s;
                            decode step: a torch.compile ~5 s
    ssd_scan           30   Mamba2-130M L 2k and -780M L 8k: a torch.compile each (~8 s), eager
                            (~12 timings); the decode step: a torch.compile ~5 s
    sparse_mlp         10   3 x 3 timings, eager peers (cuBLAS)
    end_to_end         50   GPT-2 small B8 L1024: ours (with Inductor) ~15 s (estimated), torch.compile
                            ~12 s (the anchors: 11.7 s), ours with the eager rest ~5 s to their
                            first calls, then 3 timings
    host_overhead      25   seven tiny models compiled (~3 s each), 8 ops x 30 rounds of 300 calls
    attention_training 60   2 x (ours ~4 s, flex fwd+bwd compile ~10 s, 5 timings); GPT-2 small
                            training step: ours and torch.compile fwd+bwd compiles ~20 s each
    conv_training      20   long conv fwd+bwd at L 2048: ours ~3 s, a torch.compile of fwd+bwd ~8 s
    ssm_training       30   scan fwd+bwd L 2048: assoc-compile's fwd+bwd ~20 s, the eager loop's
                            2 calls x ~2 s
    ssd_training       25   SSD fwd+bwd, Mamba2-130M L 2048: a torch.compile of fwd+bwd ~12 s, ours
                            (capture, JIT of 10 kernels) ~5 s, eager ~12 timings
    total             460   + ~10 s of Python start-up (the default budget shares 270 s)

--budget-s B (default 270) shares B seconds among the parts in proportion to these estimates
(time a part leaves unused passes on); a part starts no config past its share and names the rest
as not run, and the tests are stopped at theirs. A config in progress finishes, so the worst case
is ~10 s of start-up + B + the longest config (~35 s): give the device call a timeout of ~360 s.

Output, --out DIR (default $OUT), four files, rewritten after the tests and after every row, so a
run killed at its limit keeps everything it finished; they name every test and config from the
start, as not run until it has run:

    summary.md      the tables (each ratio to each peer, the fraction of the hardware ceiling),
                    each GPU test's outcome, and what did not run
    summary.json    the same as data (run_all's payload, plus each row's fraction_of_ceiling)
    gpu_tests.txt   pytest's log: one line per test, failures' tracebacks, the slowest tests
    gpu_check.log   progress

The exit status is 1 when a test failed or a config that ran has no time of ours. The longer
suites stay in run_all.py, one at a time.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import (attention, attention_decode, attention_training, conv_training, end_to_end, host_overhead,
                        long_conv, report, sparse_mlp, ssd_scan, ssm_scan)
from benchmarks.common import (Budget, Row, device_name, measure_ceilings, rows_payload, run_pytest, run_suite,
                               write_json)
from runtime.interpret import kernel_unavailable_reason

TESTS = "GPU tests"


@dataclass(frozen=True)
class TrainingPart:
    """A suite's fwd+bwd configs (its training_grid, run(..., training=True)) as a suite of their own."""

    suite: ModuleType

    def grid(self, quick: bool, headline: bool = False) -> list[dict]:
        return self.suite.training_grid(quick)

    def run(self, quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
        return self.suite.run(quick, device, training=True)


SUITES = {"attention": attention, "attention_decode": attention_decode, "long_conv": long_conv,
          "ssm_scan": ssm_scan, "ssd_scan": ssd_scan, "sparse_mlp": sparse_mlp, "end_to_end": end_to_end,
          "host_overhead": host_overhead, "attention_training": attention_training, "conv_training": conv_training,
          "ssm_training": TrainingPart(ssm_scan), "ssd_training": TrainingPart(ssd_scan)}  # each has grid and run
ESTIMATE_S = {TESTS: 90, "attention": 50, "attention_decode": 10, "long_conv": 35, "ssm_scan": 30, "ssd_scan": 30,
              "sparse_mlp": 10, "end_to_end": 50, "host_overhead": 25, "attention_training": 60, "conv_training": 20,
              "ssm_training": 30, "ssd_training": 25}  # H100/H200
NOT_REACHED = "not run: the check stopped before it"  # what a run killed at its limit leaves named

# Left out, for `pytest -m gpu` (run_all.py): the other at-scale cases of the same kernels, the decode
# candidates (up to 72 configs each), the unrolled L 2048 scan through compile() (~1 min of capture).
GPU_TESTS = [
    # attention forward: non-causal GQA, causal MQA, a bool mask at an awkward length, (B, L, H, d) layout
    "tests/codegen/test_attention_kernel.py::test_kernel_matches_reference_at_scale[8192x8192-d64-bfloat16-b1h8kv2]",
    "tests/codegen/test_attention_kernel.py::test_kernel_matches_reference_at_scale"
    "[4096x4096-d128-bfloat16-b2h8kv1-causal+0]",
    "tests/codegen/test_attention_kernel.py::test_kernel_matches_reference_at_scale"
    "[2064x2064-d64-float16-b2h8kv8-causal+0-boolkeepTrue-keys-fillinf]",
    "tests/codegen/test_attention_kernel.py::test_kernel_matches_reference_at_scale"
    "[8192x8192-d128-float16-b1h2kv2-blhd]",
    "tests/codegen/test_attention_kernel.py::test_every_autotuning_candidate_runs[128]",
    # attention backward: GQA causal at an awkward length, a padding mask, bottom-right; every candidate
    "tests/codegen/test_attention_backward_kernel.py::test_gradients_at_scale"
    "[2064x2064-d128-bfloat16-b1h4kv2-causal+0]",
    "tests/codegen/test_attention_backward_kernel.py::test_gradients_at_scale"
    "[1024x1024-d64-float16-b2h4kv2-boolkeepTrue-keys-fillinf]",
    "tests/codegen/test_attention_backward_kernel.py::test_every_autotuning_candidate_runs[dkdv]",
    # decode: GQA, a 128k cache, a tree mask, causal bottom-right at an awkward length
    "tests/codegen/test_attention_decode_kernel.py::test_kernel_matches_reference_at_scale"
    "[1x8192-d128-bfloat16-b1h32kv4]",
    "tests/codegen/test_attention_decode_kernel.py::test_kernel_matches_reference_at_scale"
    "[1x131072-d128-bfloat16-b1h32kv4]",
    "tests/codegen/test_attention_decode_kernel.py::test_kernel_matches_reference_at_scale"
    "[64x8192-d128-bfloat16-b1h32kv8-boolkeepTrue-tree-fillinf]",
    "tests/codegen/test_attention_decode_kernel.py::test_kernel_matches_reference_at_scale"
    "[16x4112-d128-float16-b4h32kv8-causal+4096]",
    # long and short convolution: skip, gates, (B, L, H) layout, odd sizes, every candidate
    "tests/codegen/test_long_conv_kernel.py::test_kernel_matches_reference_at_scale[b64h768l4096-bfloat16-D]",
    "tests/codegen/test_long_conv_kernel.py::test_kernel_matches_reference_at_scale[b64h768l2048-bfloat16-D+gates]",
    "tests/codegen/test_long_conv_kernel.py::test_kernel_matches_reference_at_scale[b64h768l4096-float16-D+gates-blh]",
    "tests/codegen/test_long_conv_kernel.py::test_kernel_matches_reference_at_scale[b16h111l1000-float32-D+gates]",
    "tests/codegen/test_long_conv_kernel.py::test_every_autotuning_candidate_runs[4096]",
    "tests/codegen/test_short_conv_kernel.py::test_kernel_matches_reference_at_scale"
    "[k4-b8h3072l2048-bfloat16-bias-silu-blh]",
    "tests/codegen/test_short_conv_kernel.py::test_kernel_matches_reference_at_scale[k2-b4h1001l4097-float16]",
    "tests/codegen/test_short_conv_kernel.py::test_every_autotuning_candidate_runs",
    # their backward kernels: the gated long convolution at H3's length, Mamba's short one
    "tests/codegen/test_long_conv_backward_kernel.py::test_backward_kernel_matches_reference_at_scale"
    "[b8h768l2048-bfloat16-D+gates]",
    "tests/codegen/test_short_conv_backward_kernel.py::test_backward_kernel_matches_reference_at_scale"
    "[k4-b8h3072l2048-bfloat16-bias-silu-blh]",
    # selective scan and its backward at Mamba-130M's size; sparse MLP at OPT-6.7B's, GEMV and tl.dot paths
    "tests/codegen/test_ssm_scan_kernel.py::test_scan_kernel_at_mamba_130m_size",
    "tests/codegen/test_ssm_scan_backward_kernel.py::test_backward_kernel_at_mamba_130m_size",
    "tests/codegen/test_ssd_scan_kernel.py::test_scan_kernel_at_mamba2_130m_size",
    "tests/codegen/test_ssd_scan_backward_kernel.py::test_backward_kernels_at_mamba2_130m_size",
    "tests/compiler/test_ssd_scan_pass.py::test_hf_chunk_scan_at_mamba2_780m_size",
    "tests/codegen/test_sparse_mlp_kernel.py::test_opt_6_7b_sizes_bf16[1]",
    "tests/codegen/test_sparse_mlp_kernel.py::test_opt_6_7b_sizes_bf16[16]",
    "tests/codegen/test_sparse_mlp_kernel.py::test_every_autotuning_candidate_bf16[16]",
    "tests/codegen/test_sparse_mlp_kernel.py::test_relu_llama_2_7b_sizes_bf16[1]",
    # compile() on real-size modules: the user's path, dispatch included
    "tests/compiler/test_attention_pass.py::test_cuda_real_sizes[Sdpa-shape4-8-torch.bfloat16]",
    "tests/compiler/test_attention_pass.py::test_cuda_real_sizes[NaiveCausal-shape1-None-torch.bfloat16]",
    "tests/compiler/test_attention_pass.py::test_cuda_real_sizes[Bmm3d-shape6-None-torch.float16]",
    "tests/compiler/test_attention_pass.py::test_cuda_regrouped_scores_two_masks_and_torch_modules[torch.bfloat16]",
    "tests/compiler/test_long_conv_pass.py::test_long_conv_at_scale[4096]",
    "tests/compiler/test_long_conv_pass.py::test_short_conv_at_scale",
    "tests/compiler/test_long_conv_pass.py::test_real_size_models[hyena_150m]",
    "tests/compiler/test_sparse_mlp_pass.py::test_opt_6_7b_layer_bf16[1-GatheredMLP]",
    "tests/compiler/test_sparse_mlp_pass.py::test_opt_6_7b_layer_bf16[16-MaskedMLP]",
    "tests/compiler/test_sparse_mlp_pass.py::test_relu_llama_2_7b_mlp_bf16[1]",
    # eight threads calling one compiled model (kernels run concurrently, not serialised as on the interpreter)
    "tests/reliability/test_threads.py::test_threads_share_one_compiled_model_on_the_gpu",
    # mode="reduce-overhead": a decode step captured and replayed under Inductor's CUDA graphs, a folded
    # causal buffer written through .data between replays
    "tests/runtime/test_cuda_graphs.py::test_decode_step_is_captured_and_replayed",
    "tests/runtime/test_cuda_graphs.py::test_folded_causal_buffer_under_cuda_graphs_follows_data_writes",
    # ... and models whose ops keep FFT tables and workspaces across calls (made outside the graphs' pool)
    "tests/runtime/test_cuda_graphs.py::test_tensors_kept_across_calls_stay_out_of_the_graphs_pool[hyena]",
    "tests/runtime/test_cuda_graphs.py::test_tensors_kept_across_calls_stay_out_of_the_graphs_pool[dejavu]",
]
OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
TEST_ID = re.compile(r"tests/\S+\.py::\S+")
FAILED = ("FAILED", "ERROR")

log = logging.getLogger("gpu_check")


# -- GPU tests -------------------------------------------------------------------------------
def pytest_args() -> list[str]:
    """The test files and a -k expression that selects exactly GPU_TESTS, one xdist worker per core
    (at most 16) on a GPU; verbose, so a run stopped early still names each test that finished."""
    files = list(dict.fromkeys(test.split("::")[0] for test in GPU_TESTS))
    terms = [f"({Path(file).name} and {name})" for file, name in (test.split("::") for test in GPU_TESTS)]
    workers = ["-n", str(min(16, os.cpu_count() or 1))] if torch.cuda.is_available() else []
    return ["-v", "-m", "gpu", "-k", " or ".join(terms), "-p", "no:cacheprovider", "--durations=15",
            *workers, *files]


def read_outcomes(log_path: Path, timed_out: bool) -> dict[str, str]:
    """Each selected test's outcome as pytest's log gives it (a failure wins over a pass); tests
    the log does not name are not run (timed out) or were not collected (renamed or removed)."""
    seen: dict[str, str] = {}
    for line in log_path.read_text().splitlines():
        outcome, test = OUTCOME.search(line), TEST_ID.search(line)
        if outcome and test and seen.get(test.group(0)) not in FAILED:
            seen[test.group(0)] = outcome.group(1)
    missing = "not run: the tests' time budget was spent" if timed_out else "not collected: renamed or removed?"
    return {test: seen.get(test, missing) for test in GPU_TESTS}


def run_gpu_tests(out: Path, timeout_s: float | None) -> dict:
    log.info("GPU tests: %d selected, %s s", len(GPU_TESTS), "no limit" if timeout_s is None else round(timeout_s))
    result = run_pytest(pytest_args(), out / "gpu_tests.txt", timeout_s)
    outcomes = read_outcomes(out / "gpu_tests.txt", "timed_out_s" in result)
    counts = collections.Counter(outcome.split(":")[0] for outcome in outcomes.values())
    log.info("GPU tests: %s", dict(counts))
    return {**result, "selected": len(GPU_TESTS), "counts": dict(counts), "outcomes": outcomes}


# -- results ---------------------------------------------------------------------------------
def write(out: Path, payload: dict) -> None:
    """summary.json and summary.md, from everything finished so far."""
    for rows in payload["suites"].values():
        for row in rows:
            row["fraction_of_ceiling"] = report.ceiling_fraction(row, payload["ceilings"])
    write_json(out / "summary.json", payload)
    (out / "summary.md").write_text(report.markdown(payload, title="flashfx GPU check"))


def row_written(out: Path, payload: dict, suite: str) -> None:
    row = payload["suites"][suite][-1]
    ours = "-" if row["ours_ms"] is None else f"{row['ours_ms']:.3f}"
    log.info("%s %s: ours %s ms %s", suite, row["config"], ours, row["notes"])
    write(out, payload)


def failed(payload: dict) -> bool:
    """Whether a test failed, or a config that ran has no time of ours."""
    tests = payload["gpu_tests"]["outcomes"].values()
    rows = [row for rows in payload["suites"].values() for row in rows]
    return any(outcome in FAILED for outcome in tests) or any(
        row["ours_ms"] is None and not row["notes"].startswith("not run") for row in rows)


# -- the check -------------------------------------------------------------------------------
def not_run(suite: str, configs: list[dict], why: str) -> list[dict]:
    return rows_payload([Row(suite, config, None, notes=why) for config in configs])


def new_payload(quick: bool, budget_s: float) -> dict:
    """Every test and config named, as not run until it has run."""
    suites = {name: not_run(name, suite.grid(quick, headline=True), NOT_REACHED) for name, suite in SUITES.items()}
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "budget_s": budget_s,
        "estimates_s": ESTIMATE_S,
        "ceilings": {},
        "gpu_tests": {"outcomes": dict.fromkeys(GPU_TESTS, NOT_REACHED)},
        "elapsed_s": {},
        "suites": suites,
    }


def check(out: Path, quick: bool, budget_s: float) -> dict:
    """Tests, ceilings, headline configs, in that order, written out as they finish."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(budget_s, ESTIMATE_S)
    payload = new_payload(quick, budget_s)
    write(out, payload)
    start = time.monotonic()
    payload["gpu_tests"] = run_gpu_tests(out, budget.share(TESTS))
    payload["elapsed_s"][TESTS] = round(time.monotonic() - start, 1)
    payload["ceilings"] = measure_ceilings()
    log.info("ceilings: %s", payload["ceilings"])
    write(out, payload)
    for name, suite in SUITES.items():
        start, seconds = time.monotonic(), budget.share(name)
        log.info("%s: %.0f s", name, seconds)
        run_suite(name, lambda: suite.run(quick, device, headline=True), payload,
                  lambda: row_written(out, payload, name), seconds)
        payload["elapsed_s"][name] = round(time.monotonic() - start, 1)
        write(out, payload)
    return payload


def set_up_logging(out: Path) -> None:
    log.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(out / "gpu_check.log", mode="w")):
        handler.setFormatter(formatter)
        log.addHandler(handler)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU interpreter: a smoke test")
    parser.add_argument("--budget-s", type=float, default=270.0, help="seconds for the tests and configs together")
    options = parser.parse_args()
    if not (options.quick or torch.cuda.is_available()):
        parser.error("no CUDA device: the full sizes would take hours on the interpreter; use --quick")
    unavailable = kernel_unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if unavailable is not None:  # every fused op would fall back: the check would time PyTorch, not flashfx
        parser.error(f"flashfx's kernels cannot run in this process: {unavailable}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    set_up_logging(out)
    payload = check(out, options.quick, options.budget_s)
    print((out / "summary.md").read_text())
    return 1 if failed(payload) else 0


if __name__ == "__main__":
    sys.exit(main())

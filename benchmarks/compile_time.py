"""Compile time against the sequence length and the number of layers: Hugging Face Mamba's first call
under compiler.compile, with its scan kept rolled (the default, compiler.known_scans) and as written.

    rolled       compiler.compile(model): the scan is one op at capture, whatever L
    as written   compiler.compile(model, rolled=False): Dynamo traces transformers' scan, the loop
                 unrolled L times (scan "loop": use_associative_scan=False) or torch's
                 associative_scan (scan "associative", transformers 5's default; on the CPU it is
                 decomposed into log2(L) levels of slices)

One row per (scan, layers, L): ours_ms is the rolled first call, the peer the as-written one (the
ratio: how many times faster the rolled first call is); the notes give the steady call. On the
CPU Triton's interpreter runs the kernels, so first call minus steady call is the compile time
there; on CUDA the first call also includes Inductor compiling the rest of the graph. A warm-up
at L 8 fills the kernel caches first, so both columns time capture, matching and loading rather
than Triton's JIT. The unrolled loop is not captured past UNROLLED_MAX_STEPS layer-steps: its
capture grows by a few ms per step and layer (minutes at Mamba-130M's 24 layers and L 2048).

    PYTHONPATH=. python benchmarks/run_all.py --quick --suites compile_time --skip-tests --out /tmp/x
"""
from __future__ import annotations

import functools

import torch

import compiler
from benchmarks.common import Row, first_call_s, run_configs, wall_ms

SCANS = {"loop": False, "associative": True}  # scan form -> transformers' use_associative_scan
UNROLLED_MAX_STEPS = 4096  # layers x L past which the as-written loop is not captured
QUICK_SIZES = dict(hidden_size=8, state_size=2, vocab_size=64)
FULL_SIZES = dict(hidden_size=768, state_size=16, vocab_size=1024)  # Mamba-130M's widths, a small vocabulary
WARM_UP_LENGTH = 8


def grid(quick: bool) -> list[dict]:
    layers, lengths = ((1, 2), (32, 128)) if quick else ((2, 24), (512, 2048))
    return [dict(model="hf-mamba", scan=scan, layers=count, seqlen=length)
            for scan in SCANS for count in layers for length in lengths]


def hugging_face_mamba(config: dict, quick: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import transformers  # imported here: a machine without it loses this suite, not the others

    torch.manual_seed(0)
    sizes = QUICK_SIZES if quick else FULL_SIZES
    hf_config = transformers.MambaConfig(num_hidden_layers=config["layers"],
                                         use_associative_scan=SCANS[config["scan"]], **sizes)
    return transformers.MambaForCausalLM(hf_config).to(device, dtype).eval()


def compiled_first_call(model: torch.nn.Module, ids: torch.Tensor, rolled: bool):
    """(seconds of the first call, the compiled model), from a fresh Dynamo."""
    torch._dynamo.reset()
    compiled = compiler.compile(model, rolled=rolled)
    with torch.no_grad():
        return first_call_s(lambda: compiled(ids)), compiled


def unrolled_too_long(config: dict) -> bool:
    return config["scan"] == "loop" and config["layers"] * config["seqlen"] > UNROLLED_MAX_STEPS


@functools.cache
def warm_up(scan: str, quick: bool, device: torch.device, dtype: torch.dtype) -> None:
    """Compile and run one layer at L 8 both ways, so the kernels are generated, loaded and cached."""
    model = hugging_face_mamba(dict(scan=scan, layers=1), quick, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, WARM_UP_LENGTH), device=device)
    for rolled in (True, False):
        compiled_first_call(model, ids, rolled)


def measure(config: dict, quick: bool, device: torch.device, dtype: torch.dtype) -> Row:
    warm_up(config["scan"], quick, device, dtype)
    model = hugging_face_mamba(config, quick, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, config["seqlen"]), device=device)
    rolled_s, compiled = compiled_first_call(model, ids, rolled=True)
    with torch.no_grad():
        steady_ms = wall_ms(lambda: compiled(ids))
    rolled_ms = _ms(rolled_s)
    as_written_ms = None if unrolled_too_long(config) else _ms(compiled_first_call(model, ids, rolled=False)[0])
    return Row("compile_time", config, rolled_ms, {"as written": as_written_ms},
               notes=_notes(config, compiled.report().count("rolled mamba_selective_scan"), steady_ms,
                            rolled_ms, as_written_ms))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _notes(config: dict, rolled_scans: int, steady_ms: float | None, rolled_ms: float | None,
           as_written_ms: float | None) -> str:
    """The steady call and what each first call spent beyond it (compiling), and what did not run."""
    notes = f"{rolled_scans} scans rolled"
    if steady_ms is not None:
        rolled, as_written = (f"{ms - steady_ms:.0f}" if ms is not None else "-" for ms in (rolled_ms, as_written_ms))
        notes += f"; steady call {steady_ms:.0f} ms; first minus steady: rolled {rolled}, as written {as_written} ms"
    if unrolled_too_long(config):
        notes += f"; as written not run: {config['layers']} x {config['seqlen']} unrolled steps"
    return notes


def run(quick: bool, device: torch.device) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return run_configs("compile_time", grid(quick), lambda config: measure(config, quick, device, dtype))

"""The SSD kernels (codegen/ssd_scan.py, templates/ssd_scan.py.jinja and ssd_state_update.py.jinja)
against their references in float64 (the scan's reference is chunked; it is held to models.mamba2's
loop over time here too).

Every case draws fresh random inputs at Mamba-2's scales (A_h in -1..-16, step sizes 1e-3..1e-1
after bias and softplus), poisons the outputs with NaN and launches the generated kernels. Results
obey the tolerance rule of tests/numerics.py, the baseline being the reference run on the same
inputs in their dtype (a float32 loop, rounded to the input dtype). Sizes are small and awkward
(head dim 5, 7 states, sequences that end mid-chunk) so that the interpreter runs them in seconds;
the `gpu` test adds Mamba2-130M's size.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, fields, replace

import pytest
import torch
import torch.nn.functional as F

from codegen.ssd_scan import (
    SSDSpec, SSDStateUpdateSpec, config_space, default_config, kernel_name, render_scan, render_state_update,
    ssd_scan_reference, ssd_state_update_reference, state_update_unsupported_reason, unsupported_reason)
from models import mamba2
from runtime.interpret import ensure_mode
from runtime.loader import load_source
from tests.numerics import assert_close_by_rule, poisoned_like

DEVICE = torch.device("cpu" if ensure_mode() else "cuda")
fp16, bf16, fp32, fp64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SMALL = {"CHUNK": 16, "BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_P": 16, "num_warps": 4}


@dataclass(frozen=True)
class Case:
    """One launch; strided: x and z are views into a wider (b, L, width) projection, as models hand them over."""

    batch: int = 2
    seqlen: int = 37
    heads: int = 4
    headdim: int = 5
    dstate: int = 7
    groups: int = 2
    D: bool = True
    z: bool = True
    bias: bool = True
    softplus: bool = True
    limit: bool = False
    initial: bool = False
    final: bool = True
    dtype: torch.dtype = fp32
    strided: bool = False
    config: dict | None = None

    def __str__(self) -> str:
        flags = "".join(name for name in ("D", "z", "bias", "softplus", "limit", "initial", "final") if getattr(self, name))
        parts = [f"b{self.batch}", f"L{self.seqlen}", f"h{self.heads}", f"p{self.headdim}", f"n{self.dstate}",
                 f"g{self.groups}", flags or "plain", str(self.dtype).removeprefix("torch.")]
        parts += ["strided"] if self.strided else []
        parts += ["chunk" + str(self.config["CHUNK"]) if "CHUNK" in self.config else "tiles"] if self.config else []
        return "-".join(parts)


SCAN_CASES = [
    Case(seqlen=1),
    Case(config=SMALL),
    Case(initial=True, limit=True, config=SMALL),
    Case(batch=1, seqlen=50, heads=3, headdim=16, dstate=16, groups=1, dtype=bf16, initial=True, config=SMALL),
    Case(seqlen=20, D=False, z=False, bias=False, softplus=False, final=False, dtype=fp16),
    Case(seqlen=40, strided=True, config=dict(SMALL, CHUNK=32, BLOCK_K=32)),
    Case(seqlen=70, heads=2, groups=1, dtype=bf16, strided=True),
]

STATE_UPDATE_CASES = [
    Case(seqlen=1),
    Case(seqlen=1, heads=2, groups=1, dtype=bf16, limit=True, strided=True),
    Case(seqlen=1, D=False, z=False, bias=False, softplus=False, dtype=fp16, config={"BLOCK_P": 4, "num_warps": 1}),
]


def _generator(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(str(case).encode()))


def _model_layout(x: torch.Tensor) -> torch.Tensor:
    """x's values as a view into a wider buffer whose rows (one per batch and step) have a gap."""
    flat = x.reshape(*x.shape[:2], -1)
    buffer = torch.empty(*flat.shape[:2], flat.shape[2] + 3, dtype=x.dtype, device=x.device)
    buffer[..., :flat.shape[2]] = flat
    return buffer[..., :flat.shape[2]].view(x.shape)


def _step_sizes(case: Case, g: torch.Generator):
    """(dt, dt_bias) with softplus(dt + bias) (or dt + bias) in about 1e-3..1e-1."""
    per_head = torch.exp(torch.empty(case.heads).uniform_(-6.9, -2.3, generator=g))
    steps = per_head * torch.exp(0.5 * torch.randn(case.batch, case.seqlen, case.heads, generator=g))
    pre = torch.log(torch.expm1(steps)) if case.softplus else steps
    if not case.bias:
        return pre.to(case.dtype), None
    bias = torch.log(torch.expm1(per_head)) if case.softplus else per_head / 2
    return (pre - bias).to(case.dtype), bias


def scan_inputs(case: Case) -> dict:
    g = _generator(case)
    b, L, h, p, n = case.batch, case.seqlen, case.heads, case.headdim, case.dstate
    dt, bias = _step_sizes(case, g)
    inputs = dict(
        x=torch.randn(b, L, h, p, generator=g).to(case.dtype),
        dt=dt,
        A=(-torch.exp(torch.empty(h).uniform_(0, 2.77, generator=g)))[None, None].expand(b, L, h),
        B=torch.randn(b, L, case.groups, n, generator=g).to(case.dtype),
        C=torch.randn(b, L, case.groups, n, generator=g).to(case.dtype),
        D=torch.randn(h, generator=g)[:, None].expand(h, p) if case.D else None,
        z=torch.randn(b, L, h, p, generator=g).to(case.dtype) if case.z else None,
        dt_bias=bias,
        initial_state=(0.5 * torch.randn(b, h, p, n, generator=g)).to(case.dtype) if case.initial else None,
    )
    inputs = {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}
    if case.strided:
        inputs.update((name, _model_layout(inputs[name])) for name in ("x", "z") if inputs[name] is not None)
    return inputs


def _fp64(inputs: dict) -> dict:
    return {name: None if t is None else t.to(fp64) for name, t in inputs.items()}


def _options(case: Case) -> dict:
    return dict(dt_softplus=case.softplus, dt_limit=(2e-3, 0.05) if case.limit else None)


def run_scan(case: Case, inputs: dict, module_only: bool = False):
    """(out, final state) of the generated scan's launch; its module, with `module_only`."""
    options = _options(case)
    spec = SSDSpec.for_args(inputs["D"], inputs["z"], inputs["dt_bias"], initial_state=inputs["initial_state"],
                            final_state=inputs["x"] if case.final else None, **options)
    module, _ = load_source(kernel_name(spec), render_scan(spec))
    if module_only:
        return module
    out = poisoned_like(inputs["x"])
    b, _, h, p = inputs["x"].shape
    final = torch.full((b, h, p, case.dstate), float("nan"), dtype=case.dtype, device=DEVICE) if case.final else None
    module.launch(**inputs, out=out, final_state=final, config=case.config, **options)
    return out, final


def assert_scan_matches(case: Case, inputs: dict, out, final) -> None:
    reference, reference_state = ssd_scan_reference(**_fp64(inputs), **_options(case))
    baseline, baseline_state = ssd_scan_reference(**inputs, **_options(case))
    assert_close_by_rule(out, baseline.to(case.dtype), reference)
    if final is not None:
        assert_close_by_rule(final, baseline_state.to(case.dtype), reference_state)


@pytest.mark.parametrize("case", SCAN_CASES, ids=str)
def test_scan_kernel_matches_reference(case: Case):
    inputs = scan_inputs(case)
    assert unsupported_reason(**inputs, out=inputs["x"]) is None
    assert_scan_matches(case, inputs, *run_scan(case, inputs))


@pytest.mark.parametrize("case", [SCAN_CASES[2], SCAN_CASES[5]], ids=str)
def test_scan_writes_its_reused_scratch_before_reading_it(case: Case):
    """Δ, cs and the chunk states come from buffers earlier calls used (codegen.launching.Scratch):
    filled with NaN between two calls, they must not reach the output."""
    inputs = scan_inputs(case)
    module = run_scan(case, inputs, module_only=True)
    run_scan(case, inputs)
    for scratch in module._SCRATCH._local.sets.values():
        for buffer in scratch.buffers:
            buffer.fill_(float("nan"))
    assert_scan_matches(case, inputs, *run_scan(case, inputs))


def state_update_inputs(case: Case) -> dict:
    inputs = {name: t[:, 0] if t is not None and name not in ("D", "dt_bias", "initial_state") else t
              for name, t in scan_inputs(case).items()}
    initial = inputs.pop("initial_state")
    inputs["state"] = initial if case.initial else 0.5 * torch.randn_like(inputs["x"][..., None].expand(
        -1, -1, -1, case.dstate))
    if case.strided:
        inputs["state"] = _model_layout(inputs["state"])
    return inputs


def run_state_update(case: Case, inputs: dict, new_state: torch.Tensor) -> torch.Tensor:
    options = _options(case)
    spec = SSDStateUpdateSpec.for_args(inputs["D"], inputs["z"], inputs["dt_bias"], **options)
    module, _ = load_source(kernel_name(spec), render_state_update(spec))
    out = poisoned_like(inputs["x"])
    module.launch(**inputs, new_state=new_state, out=out, config=case.config, **options)
    return out


@pytest.mark.parametrize("case", STATE_UPDATE_CASES, ids=str)
def test_state_update_kernel_matches_reference(case: Case):
    inputs = state_update_inputs(case)
    in_place = case.strided  # the strided case writes the new state over the old one
    new_state = inputs["state"] if in_place else poisoned_like(inputs["state"])
    assert state_update_unsupported_reason(**inputs, new_state=new_state, out=inputs["x"]) is None
    reference, reference_state = ssd_state_update_reference(**_fp64(inputs), **_options(case))
    baseline, baseline_state = ssd_state_update_reference(**inputs, **_options(case))
    out = run_state_update(case, inputs, new_state)
    assert_close_by_rule(out, baseline.to(case.dtype), reference)
    assert_close_by_rule(new_state, baseline_state.to(case.dtype), reference_state)


def test_chunked_reference_is_the_recurrence():
    """ssd_scan_reference (chunked, as autograd runs it) against models.mamba2's loop over time, in fp64."""
    inputs = _fp64(scan_inputs(Case(seqlen=70, initial=True)))
    y, state = ssd_scan_reference(**dict(inputs, D=None, z=None), dt_softplus=True)
    delta = F.softplus(inputs["dt"] + inputs["dt_bias"])
    B, C = (inputs[name].repeat_interleave(2, dim=2) for name in "BC")
    expected, expected_state = mamba2.ssd_recurrence(inputs["x"] * delta[..., None], delta * inputs["A"], B, C,
                                                     initial_states=inputs["initial_state"][:, None])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(state, expected_state)


def test_decode_steps_continue_the_scan():
    """Scanning 30 steps, then stepping the decode kernel from the final state, equals scanning 33."""
    case = Case(seqlen=33, config=SMALL)
    inputs = scan_inputs(case)
    full, _ = run_scan(case, inputs)
    prefix = {name: t[:, :30] if name in ("x", "dt", "A", "B", "C", "z") else t for name, t in inputs.items()}
    _, state = run_scan(replace(case, seqlen=30), prefix)
    for t in range(30, 33):
        step = {name: t_[:, t] if name in ("x", "dt", "A", "B", "C", "z") else t_ for name, t_ in inputs.items()}
        step.pop("initial_state")
        out = run_state_update(case, dict(step, state=state), state)
        torch.testing.assert_close(out, full[:, t], rtol=1e-4, atol=1e-5)


def _all_specs(spec_type):
    names = [field.name for field in fields(spec_type)]
    return [spec_type(**dict(zip(names, bits))) for bits in itertools.product((False, True), repeat=len(names))]


def test_every_variant_renders_to_python_with_a_distinct_name():
    for spec_type, render in ((SSDSpec, render_scan), (SSDStateUpdateSpec, render_state_update)):
        specs = _all_specs(spec_type)
        assert len({kernel_name(spec) for spec in specs}) == len(specs)
        for spec in specs:
            compile(render(spec), kernel_name(spec), "exec")


def test_default_configs_and_config_spaces():
    mamba2 = dict(headdim=64, dstate=128)
    assert default_config(SSDSpec(), seqlen=8192, **mamba2) == {
        "CHUNK": 256, "BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_P": 64, "num_warps": 4}
    assert default_config(SSDSpec(), seqlen=8192, headdim=64, dstate=256)["num_warps"] == 8
    assert default_config(SSDSpec(), seqlen=8192, itemsize=4, **mamba2)["BLOCK_M"] == 32
    assert default_config(SSDSpec(), seqlen=20, headdim=5, dstate=7)["CHUNK"] == 32
    assert default_config(SSDStateUpdateSpec(), **mamba2) == {"BLOCK_P": 16, "num_warps": 4}
    for dstate in (16, 64, 128, 256):
        space = config_space(SSDSpec(), seqlen=4096, headdim=64, dstate=dstate)
        assert space and all(c["BLOCK_M"] <= c["CHUNK"] and c["BLOCK_K"] <= c["CHUNK"] for c in space)
        assert config_space(SSDStateUpdateSpec(), headdim=64, dstate=dstate)


def test_unsupported_reasons_name_the_problem():
    inputs = dict(scan_inputs(Case()), out=None)
    inputs["out"] = inputs["x"]
    assert "float64" in unsupported_reason(**_fp64(inputs))
    assert "expected" in unsupported_reason(**dict(inputs, z=inputs["z"][:, :3]))
    assert "multiple of the 3 groups" in unsupported_reason(**dict(inputs, B=inputs["B"][:, :, :1].expand(-1, -1, 3, -1),
                                                                    C=inputs["C"][:, :, :1].expand(-1, -1, 3, -1)))
    assert "empty" in unsupported_reason(**{name: t[:, :0] if name in ("x", "dt", "A", "B", "C", "z", "out") else t
                                            for name, t in inputs.items()})
    assert "different devices" in unsupported_reason(**dict(inputs, A=inputs["A"].to("meta")))
    assert "dstate 300" in unsupported_reason(**dict(inputs, B=F.pad(inputs["B"], (0, 293)),
                                                     C=F.pad(inputs["C"], (0, 293))))


@pytest.mark.gpu
def test_scan_kernel_at_mamba2_130m_size():
    case = Case(batch=1, seqlen=2048 + 16, heads=24, headdim=64, dstate=128, groups=1, dtype=bf16)
    inputs = scan_inputs(case)
    assert_scan_matches(case, inputs, *run_scan(case, inputs))

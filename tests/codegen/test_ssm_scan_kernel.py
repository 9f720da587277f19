"""The selective-scan kernels (codegen/ssm_scan.py, templates/ssm_scan.py.jinja and
templates/ssm_state_update.py.jinja) against models.mamba's references.

Every case draws fresh random inputs at Mamba's scales (A negative, step sizes 1e-3..1e-1 after
bias and softplus), poisons the outputs with NaN and launches the generated kernel. The
reference is the same reference function on float64 copies; float32 results must be within
rtol 6e-4 / atol 2e-3 of it, float16/bfloat16 results obey the tolerance rule of
tests/numerics.py with the reference function run on the half-precision inputs as baseline.

Without CUDA the kernels run on Triton's interpreter, whose scan costs about 0.25 ms per tile
element, so the cases form a covering grid of small sizes (seqlen {1, 7, 128, 256, 1000},
dstate {1, 4, 16}, dim {4, 37}, groups none/1/2, every fused feature on and off) and the
scan cases use one channel block per group where they can. The `gpu` test adds Mamba-130M's size.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace

import pytest
import torch

from codegen.ssm_scan import (
    ScanSpec,
    StateUpdateSpec,
    config_space,
    default_config,
    kernel_name,
    render_scan,
    render_state_update,
    state_update_unsupported_reason,
    unsupported_reason,
)
from models.mamba import selective_scan_ref, selective_state_update_ref
from runtime.interpret import ensure_mode
from runtime.loader import load_source
from tests.numerics import assert_close_by_rule, poisoned_like

DEVICE = torch.device("cpu" if ensure_mode() else "cuda")
fp16, bf16, fp32, fp64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FP32_TOLERANCE = dict(rtol=6e-4, atol=2e-3)


@dataclass(frozen=True)
class Case:
    """One launch. groups 0: B, C are (b, n, L) (or (b, n) for a decode step); g >= 1: grouped.

    strided: u, delta, z, B, C and out are time-major views with gaps between rows, the layout
    MambaBlock hands over (the decode step gets a state inside a wider cache instead);
    config: explicit launch config, "fit" for one channel block per group (at most 16 channels),
    None for default_config.
    """

    batch: int = 1
    dim: int = 4
    seqlen: int = 7
    dstate: int = 4
    groups: int = 0
    D: bool = True
    z: bool = True
    bias: bool = True
    softplus: bool = True
    last_state: bool = True
    dtype: torch.dtype = fp32
    strided: bool = False
    config: dict | str | None = "fit"

    def __str__(self) -> str:
        flags = "".join(name for name in ("D", "z", "bias", "softplus", "last_state") if getattr(self, name))
        parts = [f"b{self.batch}", f"d{self.dim}", f"L{self.seqlen}", f"n{self.dstate}", f"g{self.groups}",
                 flags or "plain", str(self.dtype).removeprefix("torch.")]
        parts += ["strided"] if self.strided else []
        parts += [f"config{self.config}"] if self.config != "fit" else []
        return "-".join(parts)


SCAN_CASES = [
    Case(batch=2, seqlen=1, dstate=16),
    Case(batch=2, dim=37, dstate=4, bias=False, softplus=False),
    Case(seqlen=128, dstate=16, groups=2, D=False, z=False),
    Case(dim=37, seqlen=256, dstate=1, groups=1, z=False, last_state=False),
    Case(seqlen=1000, dstate=4),
    Case(seqlen=1000, dstate=1, D=False, bias=False, softplus=False, last_state=False),
    Case(seqlen=128, dstate=4, strided=True),
    Case(dstate=4, groups=2, config={"BLOCK_D": 1, "BLOCK_L": 4, "num_warps": 1}),
    Case(batch=2, dim=37, dstate=4, config=None),
    Case(batch=2, seqlen=128, dstate=16, dtype=bf16),
    Case(dim=37, dstate=16, last_state=False, dtype=fp16),
    Case(seqlen=256, dstate=4, groups=2, z=False, dtype=fp16),
    Case(seqlen=1000, dstate=1, dtype=bf16, strided=True),
]

STATE_UPDATE_CASES = [
    Case(batch=2, dim=37, dstate=16),
    Case(batch=2, dstate=4, groups=2, z=False, bias=False, strided=True),
    Case(dstate=1, D=False, z=False, bias=False, softplus=False, dtype=bf16),
    Case(batch=3, dim=37, dstate=4, groups=1, dtype=fp16),
    Case(batch=2, dstate=16, groups=2, dtype=bf16, config={"BLOCK_D": 1, "num_warps": 1}),
]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _generator(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(str(case).encode()))


def _model_layout(x: torch.Tensor) -> torch.Tensor:
    """x's values in a (b, L, 2c) buffer viewed as (b, c, L): time-major rows with gaps."""
    batch, channels, seqlen = x.shape
    view = torch.empty(batch, seqlen, 2 * channels, dtype=x.dtype, device=x.device).transpose(1, 2)[:, :channels]
    return view.copy_(x)


def _step_sizes(case: Case, shape: tuple[int, int, int], g: torch.Generator):
    """(delta, delta_bias) such that softplus(delta + bias), or delta + bias, lies in about 1e-3..1e-1."""
    per_channel = torch.exp(torch.empty(shape[1]).uniform_(-6.9, -2.3, generator=g))
    steps = per_channel[:, None] * torch.exp(0.5 * torch.randn(*shape, generator=g))
    pre = torch.log(torch.expm1(steps)) if case.softplus else steps
    if not case.bias:
        return pre.to(case.dtype), None
    bias = torch.log(torch.expm1(per_channel)) if case.softplus else per_channel / 2
    return (pre - bias[:, None]).to(case.dtype), bias


def scan_inputs(case: Case) -> dict:
    g = _generator(case)
    b, d, L, n = case.batch, case.dim, case.seqlen, case.dstate
    bc_shape = (b, case.groups, n, L) if case.groups else (b, n, L)
    delta, bias = _step_sizes(case, (b, d, L), g)
    inputs = dict(
        u=torch.randn(b, d, L, generator=g).to(case.dtype),
        delta=delta,
        A=-torch.arange(1, n + 1) * torch.exp(0.3 * torch.randn(d, n, generator=g)),
        B=torch.randn(*bc_shape, generator=g).to(case.dtype),
        C=torch.randn(*bc_shape, generator=g).to(case.dtype),
        D=torch.randn(d, generator=g) if case.D else None,
        z=torch.randn(b, d, L, generator=g).to(case.dtype) if case.z else None,
        delta_bias=bias,
    )
    inputs = {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}
    if case.strided:
        for name in ("u", "delta", "z", "B", "C"):
            if inputs[name] is not None:
                inputs[name] = _model_layout(inputs[name])
    return inputs


def _fp64(inputs: dict) -> dict:
    return {name: None if t is None else t.to(fp64) for name, t in inputs.items()}


def _scan_config(case: Case) -> dict | None:
    if case.config != "fit":
        return case.config
    channels = case.dim // max(case.groups, 1)
    return {"BLOCK_D": min(16, _pow2(channels)), "BLOCK_L": min(128, _pow2(case.seqlen)), "num_warps": 1}


def run_scan(case: Case, inputs: dict):
    spec = ScanSpec.for_args(inputs["B"], inputs["D"], inputs["z"], inputs["delta_bias"], case.softplus,
                             case.last_state)
    module, _ = load_source(kernel_name(spec), render_scan(spec))
    out = _model_layout(poisoned_like(inputs["u"])) if case.strided else poisoned_like(inputs["u"])
    b, d, n = case.batch, case.dim, case.dstate
    last_state = torch.full((b, d, n), float("nan"), device=DEVICE) if case.last_state else None
    module.launch(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], out, D=inputs["D"],
                  z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=case.softplus,
                  last_state=last_state, config=_scan_config(case))
    return out, last_state


@pytest.mark.parametrize("case", SCAN_CASES, ids=str)
def test_scan_kernel_matches_reference(case: Case):
    inputs = scan_inputs(case)
    assert unsupported_reason(**inputs) is None
    out, last_state = run_scan(case, inputs)
    reference, reference_state = selective_scan_ref(**_fp64(inputs), delta_softplus=case.softplus,
                                                    return_last_state=True)
    if case.dtype == fp32:
        torch.testing.assert_close(out.to(fp64), reference, **FP32_TOLERANCE)
    else:
        baseline = selective_scan_ref(**inputs, delta_softplus=case.softplus)
        assert_close_by_rule(out, baseline, reference)
    if case.last_state:
        torch.testing.assert_close(last_state.to(fp64), reference_state, **FP32_TOLERANCE)


def state_update_inputs(case: Case) -> tuple[dict, torch.Tensor]:
    """(inputs, cache): inputs["state"] is cache[..., :dstate], a wider cache when case.strided."""
    g = _generator(case)
    b, d, n = case.batch, case.dim, case.dstate
    bc_shape = (b, case.groups, n) if case.groups else (b, n)
    dt, bias = _step_sizes(case, (b, d, 1), g)
    cache = (0.5 * torch.randn(b, d, n + 3 if case.strided else n, generator=g)).to(case.dtype).to(DEVICE)
    inputs = dict(
        x=torch.randn(b, d, generator=g).to(case.dtype),
        dt=dt[..., 0],
        A=-torch.arange(1, n + 1) * torch.exp(0.3 * torch.randn(d, n, generator=g)),
        B=torch.randn(*bc_shape, generator=g).to(case.dtype),
        C=torch.randn(*bc_shape, generator=g).to(case.dtype),
        D=torch.randn(d, generator=g) if case.D else None,
        z=torch.randn(b, d, generator=g).to(case.dtype) if case.z else None,
        dt_bias=bias,
    )
    inputs = {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}
    return dict(state=cache[..., :n], **inputs), cache


def run_state_update(case: Case, inputs: dict) -> torch.Tensor:
    spec = StateUpdateSpec.for_args(inputs["B"], inputs["D"], inputs["z"], inputs["dt_bias"], case.softplus)
    module, _ = load_source(kernel_name(spec), render_state_update(spec))
    out = poisoned_like(inputs["x"])
    config = None if case.config == "fit" else case.config
    module.launch(*(inputs[name] for name in ("state", "x", "dt", "A", "B", "C")), out, D=inputs["D"],
                  z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=case.softplus, config=config)
    return out


@pytest.mark.parametrize("case", STATE_UPDATE_CASES, ids=str)
def test_state_update_kernel_matches_reference(case: Case):
    inputs, cache = state_update_inputs(case)
    assert state_update_unsupported_reason(**inputs) is None
    state = inputs["state"]
    reference_state, baseline_state = state.to(fp64), state.clone()
    reference = selective_state_update_ref(**_fp64(dict(inputs, state=reference_state)), dt_softplus=case.softplus)
    baseline = selective_state_update_ref(**dict(inputs, state=baseline_state), dt_softplus=case.softplus)
    untouched = cache[..., case.dstate:].clone()

    out = run_state_update(case, inputs)

    assert torch.equal(cache[..., case.dstate:], untouched)
    if case.dtype == fp32:
        torch.testing.assert_close(out.to(fp64), reference, **FP32_TOLERANCE)
        torch.testing.assert_close(state.to(fp64), reference_state, **FP32_TOLERANCE)
    else:
        assert_close_by_rule(out, baseline, reference)
        assert_close_by_rule(state, baseline_state, reference_state)


def test_decode_steps_continue_the_scan():
    """Scanning L steps, then stepping the decode kernel from last_state, equals scanning L + 3."""
    case = Case(batch=2, dim=4, seqlen=10, dstate=4, groups=2)
    inputs = scan_inputs(case)
    full, _ = run_scan(case, inputs)
    prefix = {name: t[..., :7] if name in ("u", "delta", "z", "B", "C") else t for name, t in inputs.items()}
    _, state = run_scan(replace(case, seqlen=7), prefix)
    spec = StateUpdateSpec.for_args(inputs["B"][..., 0], inputs["D"], inputs["z"], inputs["delta_bias"], True)
    module, _ = load_source(kernel_name(spec), render_state_update(spec))
    for t in range(7, 10):
        out = poisoned_like(inputs["u"][..., t])
        module.launch(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t],
                      inputs["C"][..., t], out, D=inputs["D"], z=inputs["z"][..., t], dt_bias=inputs["delta_bias"],
                      dt_softplus=True)
        torch.testing.assert_close(out, full[..., t], **FP32_TOLERANCE)


def test_launch_rejects_arguments_the_source_was_not_rendered_for():
    case = Case(z=False)
    inputs = scan_inputs(case)
    spec = ScanSpec.for_args(inputs["B"], inputs["D"], None, inputs["delta_bias"], True, True)
    module, _ = load_source(kernel_name(spec), render_scan(spec))
    with pytest.raises(ValueError, match="rendered for"):
        module.launch(*(inputs[name] for name in ("u", "delta", "A", "B", "C")), torch.empty_like(inputs["u"]),
                      D=inputs["D"], z=inputs["u"], delta_bias=inputs["delta_bias"], delta_softplus=True)


def _all_specs(spec_type):
    names = [field.name for field in fields(spec_type)]
    return [spec_type(**{name: bool(bits >> i & 1) for i, name in enumerate(names)}) for bits in range(2 ** len(names))]


def test_every_variant_renders_to_python_with_a_distinct_name():
    for spec_type, render in ((ScanSpec, render_scan), (StateUpdateSpec, render_state_update)):
        specs = _all_specs(spec_type)
        assert len({kernel_name(spec) for spec in specs}) == len(specs)
        for spec in specs:
            compile(render(spec), kernel_name(spec), "exec")


def test_default_configs_and_config_spaces():
    mamba = dict(batch=8, dim=1536, groups=1, dstate=16)
    assert default_config(ScanSpec(), **mamba, seqlen=2048) == {"BLOCK_D": 16, "BLOCK_L": 4, "num_warps": 1}
    assert default_config(ScanSpec(), **dict(mamba, batch=64), seqlen=2048)["BLOCK_D"] == 32
    assert default_config(ScanSpec(), batch=1, dim=4, groups=1, dstate=16, seqlen=7)["BLOCK_L"] == 8
    assert default_config(StateUpdateSpec(), **mamba) == {"BLOCK_D": 16, "num_warps": 2}
    for dstate in (1, 4, 16, 64, 256):
        scan_space = config_space(ScanSpec(), dstate)
        assert scan_space and all(c["BLOCK_D"] * _pow2(dstate) >= 32 for c in scan_space)
        assert config_space(StateUpdateSpec(), dstate)


def test_unsupported_reasons_name_the_problem():
    inputs = scan_inputs(Case())
    assert "float64" in unsupported_reason(**_fp64(inputs))
    assert "time-invariant" in unsupported_reason(**dict(inputs, B=inputs["A"], C=inputs["A"]))
    assert "expected" in unsupported_reason(**dict(inputs, z=inputs["z"][..., :3]))
    assert "multiple of" in unsupported_reason(**dict(inputs, B=inputs["B"][:, None].expand(-1, 3, -1, -1),
                                                      C=inputs["C"][:, None].expand(-1, 3, -1, -1)))
    assert "empty" in unsupported_reason(**{name: t[..., :0] if name in ("u", "delta", "z", "B", "C") else t
                                            for name, t in inputs.items()})
    meta = {name: None if t is None else t.to("meta") for name, t in inputs.items()}
    assert "meta" in unsupported_reason(**meta)
    assert "different devices" in unsupported_reason(**dict(inputs, A=inputs["A"].to("meta")))
    state_inputs, _ = state_update_inputs(Case())
    assert state_update_unsupported_reason(**state_inputs) is None
    assert "dstate 300" in state_update_unsupported_reason(**state_update_inputs(Case(dstate=300))[0])
    assert "x must have 2 dimensions" in state_update_unsupported_reason(**dict(state_inputs,
                                                                                 x=state_inputs["x"][None]))


@pytest.mark.gpu
def test_scan_kernel_at_mamba_130m_size():
    case = Case(batch=8, dim=1536, seqlen=2048, dstate=16, dtype=bf16, config=None)
    inputs = scan_inputs(case)
    out, last_state = run_scan(case, inputs)
    reference, reference_state = selective_scan_ref(**_fp64(inputs), delta_softplus=True, return_last_state=True)
    baseline, baseline_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert_close_by_rule(out, baseline, reference)
    assert_close_by_rule(last_state, baseline_state, reference_state)

"""The selective-scan backward kernel (codegen/ssm_scan_backward.py, templates/ssm_scan_backward.py.jinja)
against autograd through the PyTorch reference, per gradient.

Each case runs the forward kernel with checkpoints (chunk_states), then the backward kernel from them
with a random dout (and dlast_state), outputs poisoned with NaN. Every gradient (du, ddelta, dA, dB,
dC, and dD, dz, d delta_bias when fused) obeys the tolerance rule of tests/numerics.py: the reference
is autograd through selective_scan_backward_reference on float64 copies, the baseline the same on
the inputs in the dtype under test. Short chunks (8-32 steps) make every case cross several chunks
and tiles; channel tiles smaller than a group exercise the partial sums over channel blocks.
Triton's interpreter runs the backward's three scans at about 4 elements per ms, so sizes are small.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from codegen.ssm_scan import ScanSpec, block_n, kernel_name, render_scan, selective_scan_reference
from codegen.ssm_scan_backward import (backward_config_space, backward_default_config, backward_kernel_name,
                                       render_scan_backward, selective_scan_backward_reference)
from runtime.loader import load_source
from tests.codegen.test_ssm_scan_kernel import DEVICE, Case, _all_specs, _fp64, _generator, _model_layout, scan_inputs
from tests.numerics import assert_close_by_rule, poisoned_like

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
GRADIENT_OF = {"du": "u", "ddelta": "delta", "dz": "z"}


def tiles(block_d: int, block_l: int) -> dict:
    return {"BLOCK_D": block_d, "BLOCK_L": block_l, "num_warps": 1}


# (case, chunk_len, forward config, backward config)
CASES = [
    (Case(batch=2, seqlen=1, dstate=16), 8, tiles(4, 4), tiles(4, 4)),
    (Case(dim=5, seqlen=17, dstate=4, z=False), 8, tiles(8, 4), tiles(2, 4)),
    (Case(dim=6, seqlen=113, dstate=4, groups=2), 32, tiles(2, 8), tiles(4, 8)),
    (Case(dim=3, seqlen=113, dstate=16, D=False, last_state=False), 32, tiles(4, 8), tiles(4, 4)),
    (Case(dim=5, seqlen=50, dstate=3, D=False, z=False, bias=False, softplus=False, last_state=False), 16,
     tiles(2, 4), tiles(8, 8)),
    (Case(dim=4, seqlen=40, dstate=4, bias=False, strided=True), 16, tiles(4, 8), tiles(4, 8)),
    (Case(dim=4, seqlen=40, dstate=4, groups=1, dtype=bf16), 16, tiles(4, 8), tiles(2, 4)),
    (Case(batch=2, dim=4, seqlen=17, dstate=4, groups=2, softplus=False, dtype=fp16), 8, tiles(2, 4), tiles(2, 8)),
    (Case(dim=5, seqlen=17, dstate=4, config=None), 256, None, None),
]


def forward(case: Case, inputs: dict, chunk_len: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, chunk_states) of the forward kernel rendered with checkpoints."""
    spec = ScanSpec.for_args(inputs["B"], inputs["D"], inputs["z"], inputs["delta_bias"], case.softplus,
                             chunk_states=True)
    module, _ = load_source(kernel_name(spec), render_scan(spec))
    out = poisoned(case, inputs["u"])
    chunks = -(-case.seqlen // chunk_len)
    chunk_states = torch.full((case.batch, case.dim, chunks, case.dstate), float("nan"), device=DEVICE)
    module.launch(*(inputs[name] for name in ("u", "delta", "A", "B", "C")), out, D=inputs["D"], z=inputs["z"],
                  delta_bias=inputs["delta_bias"], delta_softplus=case.softplus, chunk_states=chunk_states,
                  chunk_len=chunk_len, config=config)
    return out, chunk_states


def poisoned(case: Case, like: torch.Tensor) -> torch.Tensor:
    """NaN in like's shape and dtype; in the model's time-major layout with gaps when case.strided."""
    return _model_layout(poisoned_like(like)) if case.strided else poisoned_like(like)


def output_gradients(case: Case) -> dict:
    g = _generator(replace(case, config="gradients"))
    dout = torch.randn(case.batch, case.dim, case.seqlen, generator=g).to(case.dtype).to(DEVICE)
    dlast_state = torch.randn(case.batch, case.dim, case.dstate, generator=g).to(DEVICE) if case.last_state else None
    return dict(dout=_model_layout(dout) if case.strided else dout, dlast_state=dlast_state)


def backward(case: Case, inputs: dict, grads: dict, chunk_states, chunk_len: int, config) -> dict:
    """{input name: gradient} from the backward kernel, each in its input's dtype."""
    spec = ScanSpec.for_args(inputs["B"], inputs["D"], inputs["z"], inputs["delta_bias"], case.softplus,
                             case.last_state)
    module, _ = load_source(backward_kernel_name(spec), render_scan_backward(spec))
    written = {name: poisoned(case, inputs[GRADIENT_OF[name]]) for name in ("du", "ddelta")}
    written["dz"] = poisoned(case, inputs["z"]) if case.z else None
    sums = module.launch(*(inputs[name] for name in ("u", "delta", "A", "B", "C")), grads["dout"], chunk_states,
                         written["du"], written["ddelta"], D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"],
                         delta_softplus=case.softplus, dz=written["dz"], dlast_state=grads["dlast_state"],
                         chunk_len=chunk_len, config=config)
    found = {GRADIENT_OF[name]: t for name, t in written.items() if t is not None}
    found.update((name, t.to(inputs[name].dtype)) for name, t in sums.items())
    return found


@pytest.mark.parametrize("case, chunk_len, forward_config, backward_config", CASES,
                         ids=[f"{case}-chunk{chunk}" for case, chunk, *_ in CASES])
def test_backward_kernel_matches_autograd_per_gradient(case, chunk_len, forward_config, backward_config):
    inputs = scan_inputs(case)
    grads = output_gradients(case)
    _, chunk_states = forward(case, inputs, chunk_len, forward_config)
    ours = backward(case, inputs, grads, chunk_states, chunk_len, backward_config)
    reference = selective_scan_backward_reference(**_fp64(inputs), **_fp64(grads), delta_softplus=case.softplus)
    baseline = selective_scan_backward_reference(**inputs, **grads, delta_softplus=case.softplus)
    assert set(ours) == set(reference) == {name for name, t in inputs.items() if t is not None}
    for name, grad in ours.items():
        assert grad.shape == inputs[name].shape, name
        assert_close_by_rule(grad, baseline[name].to(grad.dtype), reference[name])


def test_forward_saves_the_state_entering_each_chunk():
    case = Case(dim=4, seqlen=37, dstate=4, groups=2)
    inputs = scan_inputs(case)
    out, chunk_states = forward(case, inputs, 8, tiles(2, 4))
    reference_out, _, reference_states = selective_scan_reference(**_fp64(inputs), delta_softplus=True, chunk_len=8)
    assert chunk_states.shape == reference_states.shape == (1, 4, 5, 4)
    torch.testing.assert_close(chunk_states.double(), reference_states, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(out.double(), reference_out, rtol=6e-4, atol=2e-3)


def test_chunks_must_hold_whole_tiles():
    case = Case(seqlen=9)
    inputs = scan_inputs(case)
    with pytest.raises(ValueError, match="not a multiple of BLOCK_L"):
        forward(case, inputs, 12, tiles(4, 8))
    _, chunk_states = forward(case, inputs, 8, tiles(4, 8))
    with pytest.raises(ValueError, match="not a multiple of BLOCK_L"):
        backward(case, inputs, output_gradients(case), chunk_states, 8, tiles(4, 16))


def test_every_variant_renders_to_python_with_a_distinct_name():
    specs = [spec for spec in _all_specs(ScanSpec) if not spec.chunk_states]
    names = {backward_kernel_name(spec) for spec in specs}
    assert len(names) == len(specs) and all(name.startswith("ssm_scan_backward") for name in names)
    for spec in specs:
        compile(render_scan_backward(spec), backward_kernel_name(spec), "exec")


def test_default_configs_and_config_spaces():
    mamba = dict(batch=8, dim=1536, groups=1, dstate=16)
    assert backward_default_config(**mamba, seqlen=2048) == {"BLOCK_D": 8, "BLOCK_L": 4, "num_warps": 1}
    assert backward_default_config(batch=1, dim=4, groups=1, dstate=4, seqlen=3)["BLOCK_L"] == 4
    for dstate in (1, 4, 16, 64, 256):
        space = backward_config_space(dstate)
        assert space and all(c["BLOCK_D"] * block_n(dstate) >= 32 and 256 % c["BLOCK_L"] == 0 for c in space)


@pytest.mark.gpu
def test_backward_kernel_at_mamba_130m_size():
    """Mamba-130M's channels, states and length; batch 2 keeps the fp64 autograd reference (its
    per-step states) at ~10 GB."""
    case = Case(batch=2, dim=1536, seqlen=2048, dstate=16, dtype=bf16, config=None)
    inputs = scan_inputs(case)
    grads = output_gradients(case)
    _, chunk_states = forward(case, inputs, 256, None)
    ours = backward(case, inputs, grads, chunk_states, 256, None)
    reference = selective_scan_backward_reference(**_fp64(inputs), **_fp64(grads), delta_softplus=True)
    baseline = selective_scan_backward_reference(**inputs, **grads, delta_softplus=True)
    for name, grad in ours.items():
        assert_close_by_rule(grad, baseline[name].to(grad.dtype), reference[name])

"""The SSD scan backward kernels (codegen/ssd_scan_backward.py, templates/ssd_scan_backward.py.jinja)
against autograd through the PyTorch reference, per gradient.

Each case runs the forward kernel saving the state entering each chunk (poisoned with NaN first),
then the backward from those states with a random dout (and dfinal_state), dx and dz poisoned.
Every gradient (x, dt, A, B, C, and D, z, dt_bias, initial_state when fused) obeys the tolerance
rule of tests/numerics.py: the reference is autograd through ssd_scan_backward_reference on float64
copies, the baseline the same on the inputs in the dtype under test. Chunks of 16 or 32 steps make
most cases cross several chunks, the last one ragged; heads split over programs (HEADS below a
group's heads) exercise the partial sums of dB and dC, 32-step blocks the masks past a chunk's end.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from codegen.ssd_scan import SSDSpec, kernel_name, render_scan, ssd_scan_reference
from codegen.ssd_scan_backward import (backward_config_space, backward_default_config, backward_kernel_name,
                                       backward_unsupported_reason, render_scan_backward, saved_chunk,
                                       ssd_scan_backward_reference)
from runtime.loader import load_source
from tests.codegen.test_ssd_scan_kernel import (DEVICE, SMALL, Case, _all_specs, _fp64, _generator, _model_layout,
                                                _options, scan_inputs)
from tests.numerics import assert_close_by_rule, poisoned_like

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def tiles(rows: int = 16, steps: int = 16, heads: int = 1) -> dict:
    return {"BLOCK_M": rows, "BLOCK_K": steps, "BLOCK_P": 16, "HEADS": heads, "num_warps": 4, "num_stages": 1}


# (case, forward config (its CHUNK is the saved chunk), backward config)
CASES = [
    (Case(seqlen=1), SMALL, tiles()),
    (Case(seqlen=17, heads=2, groups=1, headdim=7, dstate=5, z=False), SMALL, tiles()),
    (Case(seqlen=37, initial=True, limit=True), SMALL, tiles(heads=2)),
    (Case(seqlen=70, heads=4, groups=1, D=False, z=False, bias=False, softplus=False, final=False),
     dict(SMALL, CHUNK=32, BLOCK_M=32), tiles(16, 32, heads=3)),
    (Case(seqlen=40, strided=True, initial=True), dict(SMALL, CHUNK=32), tiles(32, 16)),
    (Case(batch=1, seqlen=50, heads=3, headdim=16, dstate=16, groups=1, dtype=bf16, initial=True), SMALL,
     tiles(heads=2)),
    (Case(seqlen=20, heads=2, groups=2, z=False, dtype=fp16, final=False), SMALL, tiles()),
    (Case(seqlen=24, headdim=3, dstate=4), None, None),
]


def forward(case: Case, inputs: dict, config) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(out, final_state, chunk_states) of the forward kernel saving the states its backward reads."""
    spec = SSDSpec.for_args(inputs["D"], inputs["z"], inputs["dt_bias"], initial_state=inputs["initial_state"],
                            final_state=inputs["x"] if case.final else None, **_options(case))
    module, _ = load_source(kernel_name(spec), render_scan(spec))
    b, L, h, p = inputs["x"].shape
    chunk = config["CHUNK"] if config else saved_chunk(L)
    chunk_states = torch.full((b, -(-L // chunk), h, p, case.dstate), float("nan"), device=DEVICE)
    final = torch.full((b, h, p, case.dstate), float("nan"), dtype=case.dtype, device=DEVICE) if case.final else None
    out = module.launch(**inputs, out=poisoned_like(inputs["x"]), final_state=final, chunk_states=chunk_states,
                        config=config, **_options(case))
    return out, final, chunk_states


def output_gradients(case: Case) -> dict:
    g = _generator(replace(case, config={"gradients": 1}))
    b, L, h, p, n = case.batch, case.seqlen, case.heads, case.headdim, case.dstate
    dout = torch.randn(b, L, h, p, generator=g).to(case.dtype).to(DEVICE)
    dfinal = torch.randn(b, h, p, n, generator=g).to(case.dtype).to(DEVICE) if case.final else None
    return dict(dout=_model_layout(dout) if case.strided else dout, dfinal_state=dfinal)


def backward(case: Case, inputs: dict, grads: dict, chunk_states, chunk: int | None, config) -> dict:
    """{input name: gradient} from the backward kernels, each in its input's dtype."""
    spec = SSDSpec.for_args(inputs["D"], inputs["z"], inputs["dt_bias"], initial_state=inputs["initial_state"],
                            final_state=grads["dfinal_state"], **_options(case))
    module, _ = load_source(backward_kernel_name(spec), render_scan_backward(spec))
    written = {name: None if inputs[name] is None else poisoned_like(inputs[name]) for name in ("x", "z")}
    sums = module.launch(**inputs, **grads, chunk_states=chunk_states, dx=written["x"], dz=written["z"],
                         chunk=chunk, config=config, **_options(case))
    found = {name: t for name, t in written.items() if t is not None}
    found.update((name, t.to(inputs[name].dtype)) for name, t in sums.items())
    return found


@pytest.mark.parametrize("case, forward_config, backward_config", CASES, ids=[str(case) for case, *_ in CASES])
def test_backward_kernels_match_autograd_per_gradient(case, forward_config, backward_config):
    inputs = scan_inputs(case)
    grads = output_gradients(case)
    _, _, chunk_states = forward(case, inputs, forward_config)
    chunk = forward_config["CHUNK"] if forward_config else None
    ours = backward(case, inputs, grads, chunk_states, chunk, backward_config)
    reference = ssd_scan_backward_reference(**_fp64(inputs), **_fp64(grads), **_options(case))
    baseline = ssd_scan_backward_reference(**inputs, **grads, **_options(case))
    assert set(ours) == set(reference) == {name for name, t in inputs.items() if t is not None}
    for name, grad in ours.items():
        assert grad.shape == inputs[name].shape, name
        assert_close_by_rule(grad, baseline[name].to(grad.dtype), reference[name])


def test_forward_saves_the_state_entering_each_chunk():
    case = Case(seqlen=37, initial=True)
    inputs = scan_inputs(case)
    out, _, chunk_states = forward(case, inputs, SMALL)
    reference_out, _, reference_states = ssd_scan_reference(**_fp64(inputs), **_options(case), chunk=16,
                                                            chunk_states=True)
    assert chunk_states.shape == reference_states.shape == (2, 3, 4, 5, 7)
    torch.testing.assert_close(chunk_states.double(), reference_states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), reference_out, rtol=1e-4, atol=1e-5)


def test_saved_states_must_match_the_chunks():
    case = Case(seqlen=37)
    inputs = scan_inputs(case)
    _, _, chunk_states = forward(case, inputs, SMALL)
    with pytest.raises(ValueError, match="not the states entering the 2 chunks of 32"):
        backward(case, inputs, output_gradients(case), chunk_states, 32, tiles())
    with pytest.raises(ValueError, match="no whole BLOCK_M"):
        backward(case, inputs, output_gradients(case), chunk_states, 16, tiles(rows=32))


def test_every_variant_renders_to_python_with_a_distinct_name():
    specs = _all_specs(SSDSpec)
    names = {backward_kernel_name(spec) for spec in specs}
    assert len(names) == len(specs) and all(name.startswith("ssd_scan_backward") for name in names)
    for spec in specs:
        compile(render_scan_backward(spec), backward_kernel_name(spec), "exec")


def test_default_configs_config_spaces_and_sizes():
    mamba2_130m = dict(heads=24, groups=1, headdim=64, dstate=128)
    config = backward_default_config(batch=1, seqlen=2048, **mamba2_130m)
    assert config == {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_P": 64, "HEADS": 8, "num_warps": 8, "num_stages": 1}
    assert backward_default_config(batch=8, seqlen=8192, **mamba2_130m)["HEADS"] == 24
    assert backward_default_config(batch=1, seqlen=20, heads=4, groups=2, headdim=5, dstate=7)["BLOCK_K"] == 32
    assert saved_chunk(20) == 32 and saved_chunk(5000) == 256
    assert backward_unsupported_reason(64, 256) is None and backward_unsupported_reason(128, 128) is None
    assert "128 by 256 states" in backward_unsupported_reason(128, 256)
    for headdim, dstate in ((64, 16), (64, 128), (128, 128), (256, 256)):
        space = backward_config_space(seqlen=4096, heads=8, groups=2, headdim=headdim, dstate=dstate)
        assert space and all(c["BLOCK_M"] <= 256 and 1 <= c["HEADS"] <= 4 for c in space)


@pytest.mark.gpu
def test_backward_kernels_at_mamba2_130m_size():
    """Mamba2-130M's layer (24 heads of 64, 128 states, one group) at L 2048 + 16 (chunks of 256, a
    ragged last one), bf16, every part fused, the default configs."""
    case = Case(batch=1, seqlen=2048 + 16, heads=24, headdim=64, dstate=128, groups=1, dtype=bf16, initial=True,
                limit=True)
    inputs = scan_inputs(case)
    grads = output_gradients(case)
    _, _, chunk_states = forward(case, inputs, None)
    ours = backward(case, inputs, grads, chunk_states, None, None)
    reference = ssd_scan_backward_reference(**_fp64(inputs), **_fp64(grads), **_options(case))
    baseline = ssd_scan_backward_reference(**inputs, **grads, **_options(case))
    for name, grad in ours.items():
        assert_close_by_rule(grad, baseline[name].to(grad.dtype), reference[name])

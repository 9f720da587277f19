"""Selective-scan backward kernel (Mamba's SSM under training): rendering, configs and reference.

The template ssm_scan_backward.py.jinja differentiates the chunked scan of ssm_scan.py.jinja for
one forward ScanSpec. The forward, run for training, stores the state entering every chunk of
CHUNK_LEN steps (b, d, L / CHUNK_LEN, n); the backward never stores more states than that:

    for each chunk, last first (one program per (channel block, group, batch)):
        recompute the states entering each tile of BLOCK_L steps into a per-program scratch
        for each tile, last first:
            recompute the tile's states h_t and x_t = a_t h_{t-1} (one associative scan)
            g_t = dy_t C_t + a_{t+1} g_{t+1}                (one reverse associative scan)
            du, ddelta, dz stored; dB, dC summed over the program's channels; dA, dD, d bias kept

dB and dC are per-program partials over channel blocks, dA, dD and d delta_bias partials over
the batch, all float32, summed by the launcher with torch.sum: deterministic, no atomics.
`selective_scan_backward_reference` is the same math by autograd through the forward's reference.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from codegen import ssm_scan
from codegen.render import render
from codegen.ssm_scan import ScanSpec, block_n, next_power_of_2, selective_scan_reference, with_shapes

BACKWARD_SHAPES = ssm_scan.SCAN_SHAPES + """
    dout        (b, d, L)                    gradient of out
    dlast_state (b, d, n)                    gradient of last_state (when the forward returned it)
    du, ddelta, dz  like u, delta, z         written in their tensors' dtypes
    dA, dB, dC, dD, d delta_bias             float32 sums, shaped like A, B, C, D, delta_bias"""



def forward_spec(spec: ScanSpec) -> ScanSpec:
    """The forward a backward kernel differentiates, without the checkpoint flag (it always needs them)."""
    return dataclasses.replace(spec, chunk_states=False)


def backward_kernel_name(spec: ScanSpec) -> str:
    """e.g. ssm_scan_backward_D_z_delta_bias_delta_softplus."""
    return ssm_scan.kernel_name(forward_spec(spec)).replace("ssm_scan", "ssm_scan_backward", 1)


def render_scan_backward(spec: ScanSpec) -> str:
    """Triton source of the selective-scan backward for the forward `spec`."""
    spec = forward_spec(spec)
    flags = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "chunk_states"}
    return render("ssm_scan_backward.py.jinja", name=backward_kernel_name(spec), spec=repr(spec),
                  shapes=BACKWARD_SHAPES, **flags)


def backward_default_config(*, batch: int, dim: int, groups: int, dstate: int, seqlen: int) -> dict:
    """A first guess: one warp, lanes on channels then states, about 16 fp32 elements per thread
    per [BLOCK_L, BLOCK_N, BLOCK_D] tile (the backward keeps about six tiles and B, C live, against
    the forward's two: at 32 elements ptxas spills), 4 to 8 steps (a dozen [BLOCK_L, BLOCK_D]
    vectors are live too)."""
    bn = block_n(dstate)
    block_d = max(min(128 // bn, 32, next_power_of_2(dim // groups)), 1)
    states_per_thread = max(bn * block_d // 32, 1)
    block_l = min(max(16 // states_per_thread, 4), 8, next_power_of_2(seqlen))
    return {"BLOCK_D": block_d, "BLOCK_L": block_l, "num_warps": 1}


def backward_config_space(dstate: int) -> list[dict]:
    """Lanes never on time, warps only on channels, 4 to 32 elements per thread per tile."""
    bn = block_n(dstate)
    return [{"BLOCK_D": block_d, "BLOCK_L": block_l, "num_warps": warps}
            for block_d, block_l, warps in itertools.product((1, 2, 4, 8, 16, 32, 64), (4, 8, 16, 32), (1, 2, 4))
            if block_d * bn >= 32 and not (warps > 1 and block_d < 32 * warps)
            and 4 <= block_l * bn * block_d // (32 * warps) <= 32]


@with_shapes(BACKWARD_SHAPES)
def selective_scan_backward_reference(u, delta, A, B, C, dout, D=None, z=None, delta_bias=None,
                                      delta_softplus=False, dlast_state=None) -> dict[str, torch.Tensor]:
    """{name: gradient} of selective_scan_reference by autograd, in its compute dtype, for every
    tensor argument given (du, ddelta, dA, dB, dC, and dD, dz, d delta_bias when given)."""
    given = {name: t for name, t in dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias).items()
             if t is not None}
    leaves = {name: t.detach().requires_grad_() for name, t in given.items()}
    with torch.enable_grad():
        out, state, _ = selective_scan_reference(**leaves, delta_softplus=delta_softplus)
        outputs, grads = [out], [dout.to(out.dtype)]
        if dlast_state is not None:
            outputs.append(state)
            grads.append(dlast_state.to(state.dtype))
        found = torch.autograd.grad(outputs, list(leaves.values()), grads)
    return dict(zip(leaves, found))

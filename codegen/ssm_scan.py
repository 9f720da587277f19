"""Selective-scan kernels (Mamba's SSM): spec, rendering, launch grid, configs and support checks.

Two templates implement the selective scan and its decode step (models.mamba's references):

  ssm_scan.py.jinja          selective_scan_ref: the whole sequence, chunked along time
  ssm_state_update.py.jinja  selective_state_update_ref: one decoding step, state in place

Chunked scan, one program per (channel block, group, batch), state h in fp32 registers:

    h = 0
    for each chunk of BLOCK_L steps:
        a, b   = exp2(Δ A log2 e), Δ B u;  b[0] += a[0] h         [BLOCK_L, BLOCK_N, BLOCK_D]
        (_, H) = associative_scan((a, b), time,  (a0, b0), (a1, b1) -> (a1 a0, a1 b0 + b1))
        y      = Σ_n H C + D u;  y *= silu(z)                    H never leaves registers
        h      = H[last step]

Tiles are laid out [time, state, channels] so that Triton's default layout puts the lanes on
channels (then state) and each thread's time steps in its own registers: the scan is then a
sequential FMA chain, the products a1 a0 are dead code and no shuffles are needed. A config is
good on a GPU when lanes never land on time (BLOCK_D * BLOCK_N >= 32) and warps only split
channels (BLOCK_D >= 32 * num_warps when num_warps > 1); config_space keeps those.

For training (spec.chunk_states) the scan also stores h entering every CHUNK_LEN steps, the
checkpoints codegen/ssm_scan_backward.py's kernel recomputes the states from.

Every generated module exposes `launch(...)` (see the templates for signatures), a `SPEC`
it was rendered for, and its kernel under `kernel_name(spec)`. `selective_scan_reference` and
`state_update_reference` are the same math in PyTorch for the runtime's fallback (the runtime
does not import models/). Channels are tiled inside one
group so that a program loads one [BLOCK_N, BLOCK_L] slice of B and C for all its channels.
"""
from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from codegen.render import render
from ir.limits import KERNEL_DTYPES, MAX_GRID_YZ

SCAN_SHAPES = """Shapes (b batch, d channels, L seqlen, n dstate, g groups of channels sharing B and C):
    u           (b, d, L)                    input sequence
    delta       (b, d, L)                    step size Δ, before delta_bias and softplus
    A           (d, n)                       diagonal state matrix (real, negative)
    B, C        (b, n, L) or (b, g, n, L)    input and output projections; channel c reads group c // (d // g)
    D           (d,)                         skip: y += D * u
    z           (b, d, L)                    gate: out = y * silu(z)
    delta_bias  (d,)                         added to delta before the softplus
    out         (b, d, L)                    dtype of u
    last_state  (b, d, n)                    h after the last step
    chunk_states (b, d, cdiv(L, chunk_len), n)  h entering each chunk of chunk_len steps, float32"""

STATE_UPDATE_SHAPES = """Shapes (b batch, d channels, n dstate, g groups of channels sharing B and C):
    state       (b, d, n)                    h_{t-1}, overwritten in place with h_t
    x           (b, d)                       input u_t
    dt          (b, d)                       step size Δ_t, before dt_bias and softplus
    A           (d, n)                       diagonal state matrix (real, negative)
    B, C        (b, n) or (b, g, n)          input and output projections; channel c reads group c // (d // g)
    D           (d,)                         skip: y += D * x
    z           (b, d)                       gate: out = y * silu(z)
    dt_bias     (d,)                         added to dt before the softplus
    out         (b, d)                       dtype of x"""


def with_shapes(shapes: str):
    """Append a shape table to a function's docstring; kernel launchers render the same table."""

    def decorate(fn):
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__)}\n\n{shapes}\n"
        return fn

    return decorate

MAX_DSTATE = 256
CHUNK_LEN = 256  # steps between the states a training forward saves for the backward (a power of 2)
TARGET_PROGRAMS = 512  # default_config's lower bound on the grid: about 4 one-warp programs per SM


@dataclass(frozen=True)
class ScanSpec:
    """What a chunked-scan kernel fuses; one rendered source per distinct spec."""

    has_D: bool = False
    has_z: bool = False
    has_delta_bias: bool = False
    delta_softplus: bool = False
    grouped: bool = False
    return_last_state: bool = False
    chunk_states: bool = False  # forward only: store the backward's checkpoints

    @classmethod
    def for_args(cls, B, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
                 chunk_states=False):
        """The spec a selective_scan_ref call with these arguments needs."""
        return cls(has_D=D is not None, has_z=z is not None, has_delta_bias=delta_bias is not None,
                   delta_softplus=bool(delta_softplus), grouped=B.dim() == 4,
                   return_last_state=bool(return_last_state), chunk_states=bool(chunk_states))


@dataclass(frozen=True)
class StateUpdateSpec:
    """What a decode-step kernel fuses; one rendered source per distinct spec."""

    has_D: bool = False
    has_z: bool = False
    has_dt_bias: bool = False
    dt_softplus: bool = False
    grouped: bool = False

    @classmethod
    def for_args(cls, B, D=None, z=None, dt_bias=None, dt_softplus=False):
        """The spec a selective_state_update_ref call with these arguments needs."""
        return cls(has_D=D is not None, has_z=z is not None, has_dt_bias=dt_bias is not None,
                   dt_softplus=bool(dt_softplus), grouped=B.dim() == 3)


def kernel_name(spec: ScanSpec | StateUpdateSpec) -> str:
    """e.g. ssm_scan_D_z_delta_bias_delta_softplus: the family, then every fused feature."""
    family = "ssm_scan" if isinstance(spec, ScanSpec) else "ssm_state_update"
    flags = [flag_name(f.name) for f in fields(spec) if getattr(spec, f.name)]
    return "_".join([family, *flags])


def flag_name(field: str) -> str:
    return field.removeprefix("has_").removeprefix("return_")


def render_scan(spec: ScanSpec) -> str:
    """Triton source of the chunked selective scan for `spec`."""
    return render("ssm_scan.py.jinja", name=kernel_name(spec), spec=repr(spec), shapes=SCAN_SHAPES,
                  **template_flags(spec))


def render_state_update(spec: StateUpdateSpec) -> str:
    """Triton source of the one-step state update for `spec`."""
    return render("ssm_state_update.py.jinja", name=kernel_name(spec), spec=repr(spec),
                  shapes=STATE_UPDATE_SHAPES, **template_flags(spec))


def template_flags(spec) -> dict[str, bool]:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


def require_spec(rendered, requested) -> None:
    """Raise when a launcher is called with optional arguments its source was not rendered for."""
    if rendered != requested:
        raise ValueError(f"flashfx: kernel rendered for {rendered} called with arguments needing {requested}")


def check_chunk_len(chunk_len: int, block_l: int) -> None:
    """Chunks hold whole tiles of time steps: raise unless chunk_len is a multiple of BLOCK_L."""
    if chunk_len % block_l:
        raise ValueError(f"flashfx: chunk_len {chunk_len} is not a multiple of BLOCK_L {block_l}")


def block_n(dstate: int) -> int:
    """The state axis is never split: one power-of-two tile covers it."""
    return next_power_of_2(dstate)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scan_grid(config: dict, batch: int, dim: int, groups: int) -> tuple[int, int, int]:
    """(channel blocks within a group, groups, batch): a block never straddles two groups."""
    return _cdiv(dim // groups, config["BLOCK_D"]), groups, batch


# What default_config and config_space set, for the scan and for the decode step.
CONFIG_KEYS = ("BLOCK_D", "BLOCK_L", "num_warps")
STATE_UPDATE_CONFIG_KEYS = ("BLOCK_D", "num_warps")


def default_config(spec: ScanSpec | StateUpdateSpec, *, batch: int, dim: int, groups: int, dstate: int,
                   seqlen: int = 1) -> dict:
    """A first guess before autotuning: the channel tile is halved while the grid has fewer than
    TARGET_PROGRAMS programs.

    Scan: one warp; lanes on BLOCK_D channels first, the remaining 32 / BLOCK_D lanes on states
    (never on time), at most 16 states and about 32 fp32 elements per thread (BLOCK_L steps of
    those states).
    Decode step: tiles of up to 512 elements, 4 per thread.
    """
    bn = block_n(dstate)
    channels = dim // groups
    if isinstance(spec, StateUpdateSpec):
        block_d = _shrink_for_grid(min(max(512 // bn, 1), next_power_of_2(channels)), 4, batch, groups, channels)
        return {"BLOCK_D": block_d, "num_warps": min(max(block_d * bn // 128, 1), 4)}
    block_d = _shrink_for_grid(min(32, max(512 // bn, 1), next_power_of_2(channels)), max(8, 32 // bn),
                               batch, groups, channels)
    states_per_thread = max(bn * block_d // 32, 1)
    block_l = min(max(32 // states_per_thread, 4), 32, next_power_of_2(seqlen))
    return {"BLOCK_D": block_d, "BLOCK_L": block_l, "num_warps": 1}


def _shrink_for_grid(block_d: int, smallest: int, batch: int, groups: int, channels: int) -> int:
    while block_d > smallest and batch * groups * _cdiv(channels, block_d) < TARGET_PROGRAMS:
        block_d //= 2
    return block_d


def config_space(spec: ScanSpec | StateUpdateSpec, dstate: int) -> list[dict]:
    """Candidates for the autotuner.

    Scan: lanes never on time, warps only on channels, 8-64 elements per thread.
    Decode step: 2-32 elements per thread.
    """
    bn = block_n(dstate)
    if isinstance(spec, StateUpdateSpec):
        return [{"BLOCK_D": block_d, "num_warps": warps}
                for block_d, warps in itertools.product((4, 8, 16, 32, 64, 128), (1, 2, 4, 8))
                if 2 <= block_d * bn // (32 * warps) <= 32]
    return [{"BLOCK_D": block_d, "BLOCK_L": block_l, "num_warps": warps}
            for block_d, block_l, warps in itertools.product((1, 2, 4, 8, 16, 32, 64, 128), (4, 8, 16, 32), (1, 2, 4))
            if _good_scan_tile(block_d, bn, block_l, warps)]


def _good_scan_tile(block_d: int, bn: int, block_l: int, warps: int) -> bool:
    lanes_on_time = block_d * bn < 32
    warps_on_state = warps > 1 and block_d < 32 * warps
    return not lanes_on_time and not warps_on_state and 8 <= block_l * bn * block_d // (32 * warps) <= 64


def unsupported_reason(u, delta, A, B, C, D=None, z=None, delta_bias=None, last_state=None, out=None) -> str | None:
    """Why the chunked-scan kernel cannot run this selective_scan_ref call, or None when it can."""
    given = given_tensors(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, last_state=last_state, out=out)
    reason = (device_reason(given) or dtype_reason(given)
              or rank_reason(given, u=3, delta=3, A=2, D=1, z=3, delta_bias=1, last_state=3, out=3))
    if reason:
        return reason
    if B.dim() not in (3, 4) or C.dim() != B.dim():
        return (f"B and C must both be (batch, dstate, seqlen) or (batch, groups, dstate, seqlen), got shapes "
                f"{tuple(B.shape)} and {tuple(C.shape)} (time-invariant B or C is not supported)")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    groups = B.shape[1] if B.dim() == 4 else 1
    bc_shape = (batch, groups, dstate, seqlen) if B.dim() == 4 else (batch, dstate, seqlen)
    expected = dict(delta=(batch, dim, seqlen), A=(dim, dstate), B=bc_shape, C=bc_shape, D=(dim,), z=(batch, dim, seqlen),
                    delta_bias=(dim,), last_state=(batch, dim, dstate), out=(batch, dim, seqlen))
    return shape_reason(given, expected) or _size_reason(batch, dim, dstate, groups, seqlen)


def state_update_unsupported_reason(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, out=None) -> str | None:
    """Why the decode-step kernel cannot run this selective_state_update_ref call, or None when it can."""
    given = given_tensors(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, out=out)
    reason = (device_reason(given) or dtype_reason(given)
              or rank_reason(given, state=3, x=2, dt=2, A=2, D=1, z=2, dt_bias=1, out=2))
    if reason:
        return reason
    if B.dim() not in (2, 3) or C.dim() != B.dim():
        return (f"B and C must both be (batch, dstate) or (batch, groups, dstate), got shapes "
                f"{tuple(B.shape)} and {tuple(C.shape)}")
    batch, dim, dstate = state.shape
    groups = B.shape[1] if B.dim() == 3 else 1
    bc_shape = (batch, groups, dstate) if B.dim() == 3 else (batch, dstate)
    expected = dict(x=(batch, dim), dt=(batch, dim), A=(dim, dstate), B=bc_shape, C=bc_shape, D=(dim,),
                    z=(batch, dim), dt_bias=(dim,), out=(batch, dim))
    return shape_reason(given, expected) or _size_reason(batch, dim, dstate, groups, seqlen=1)


def given_tensors(**tensors) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def device_reason(tensors: dict[str, torch.Tensor]) -> str | None:
    devices = {tensor.device for tensor in tensors.values()}
    if len(devices) > 1:
        placed = ", ".join(f"{name} on {tensor.device}" for name, tensor in tensors.items())
        return f"tensors are on different devices ({placed})"
    device = devices.pop()
    if device.type not in ("cuda", "cpu"):
        return f"device {device} is neither CUDA nor the CPU (Triton's interpreter)"
    return None


def dtype_reason(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, tensor in tensors.items():
        if tensor.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {tensor.dtype}; the kernel takes float32, float16 or bfloat16 (real only)"
    return None


def rank_reason(tensors: dict[str, torch.Tensor], **ranks: int) -> str | None:
    for name, rank in ranks.items():
        if name in tensors and tensors[name].dim() != rank:
            return f"{name} must have {rank} dimensions, got shape {tuple(tensors[name].shape)}"
    return None


def shape_reason(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            return f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}"
    return None


def _size_reason(batch: int, dim: int, dstate: int, groups: int, seqlen: int) -> str | None:
    if min(batch, dim, dstate, groups, seqlen) == 0:
        return "empty tensors (a zero-sized batch, channel, state, group or time axis)"
    if dim % groups:
        return f"dim {dim} is not a multiple of the {groups} groups of B and C"
    if dstate > MAX_DSTATE:
        return f"dstate {dstate} exceeds {MAX_DSTATE}: the state tile must fit in registers"
    if max(batch, groups) > MAX_GRID_YZ:
        return f"batch {batch} or groups {groups} exceeds the launch grid's limit of {MAX_GRID_YZ}"
    return None


def compute_dtype(*tensors) -> torch.dtype:
    """float32, or float64 when any input is float64."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None), torch.float32)


def _channel_major(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C, (b, n, L) or (b, g, n, L), as (b, 1 or d, L, n): channel c reads group c // (d // g)."""
    if BC.dim() == 3:
        return BC[:, None].transpose(-1, -2)
    return BC.repeat_interleave(dim // BC.shape[1], dim=1).transpose(-1, -2)


@with_shapes(SCAN_SHAPES)
def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             chunk_len=CHUNK_LEN):
    """(out, last_state, chunk_states) of the chunked scan in PyTorch: a loop over L in float32
    (float64 when an input is float64), all three in that compute dtype."""
    compute = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape
    deltaA = torch.exp(delta[..., None] * A[:, None, :])
    deltaB_u = (delta * u)[..., None] * _channel_major(B, dim)
    C = _channel_major(C, dim)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys, checkpoints = [], []
    for t in range(seqlen):
        if t % chunk_len == 0:
            checkpoints.append(h)
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append((h * C[:, :, t]).sum(-1))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    return out, h, torch.stack(checkpoints, dim=2)


@with_shapes(STATE_UPDATE_SHAPES)
def state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """(out, new_state) of one decode step in PyTorch, in float32 (float64 when an input is float64);
    `state` is left unchanged."""
    compute = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    state, x, dt, A, B, C = (t.to(compute) for t in (state, x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)
    dim = x.shape[1]
    B, C = (_channel_major(t[..., None], dim)[:, :, 0] for t in (B, C))
    h = torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B
    out = (h * C).sum(-1)
    if D is not None:
        out = out + x * D.to(compute)
    if z is not None:
        out = out * F.silu(z.to(compute))
    return out, h

"""Mamba's selective scan, its decode step and a Mamba-130M-like model, ours against the peers.

    scan    b 8, d 1536, n 16, L 256..8192, bf16 u, Δ, z, B, C (B, C as (b, n, L)); A, D and
            delta_bias in fp32, as models.mamba's block passes them:
            out = selective_scan_ref(u, Δ, A, B, C, D, z, delta_bias, delta_softplus=True)
    decode  one step, the state (b, d, n) updated in place, d 1536, n 16, batch 1..256, bf16:
            out = selective_state_update_ref(state, x, Δ, A, B, C, D, z, dt_bias, dt_softplus=True)
    model   Mamba-130M-like LM (models.mamba.MambaConfig.mamba_130m()) forward, batch 8, L 2048
    scan_train   the scan's forward and backward (every input's gradient, for a random dout), L 2048
    model_train  the Mamba-130M-like LM's training step: forward, cross-entropy, backward, in bf16

    ours              compiler.compile of the module (the user's path). The scan's Python loop is
                      traced unrolled up to L 512 and kept rolled from L 1024 on and in the model
                      (compiler.register_rolled: capture then costs the same at every L), as the
                      row's `loop` says; the notes give ours' first call (capture, match, generate)
    eager             the module in PyTorch: the loop runs one step at a time (scan rows up to L 2048,
                      model: one warm and one timed call, ~6 s each)
    assoc-compile     the scan written as Hugging Face's Mamba writes it under TorchDynamo (torch's
                      associative_scan, combine (a_l, b_l), (a_r, b_r) -> (a_l a_r, a_r b_l + b_r),
                      pointwise mode on CUDA) compiled by Inductor; at L 256, 2048 and 8192 (each
                      length is a compile), and for the model (the scan function swapped in)
    torch.compile     Inductor on the decode step. Not run on the model's unrolled loop: at
                      L >= 1024 its capture takes many minutes (the anchors' did not finish in ~7)
    memory floor      every operand read once and the output written once (decode: the state read
                      and written too) at the copy bandwidth measured in this run. z is read by the
                      gate, so it counts (the anchors' 0.051 ms at L 2048 leaves it out). fwd+bwd:
                      the operands read twice, out and dout once, every gradient written once
    exp2 floor        b·d·L·n exponentials (the discretisation exp(Δ A)) at the tl.exp2 rate
                      measured in this run (common.measure_ceilings); fwd+bwd: twice that, as a
                      backward that recomputes the states needs (ours takes three: its backward
                      walks each chunk twice)

saved_memory(quick) gives rows of the bytes autograd saves for the backward (ours, and eager's
loop), measured on the meta device, so the table needs no GPU: see its docstring.

Times in ms; ratios are peer / ours, so against a floor the ratio is the fraction of it we reach.
"""
from __future__ import annotations

import contextlib
import functools
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from benchmarks.common import (Row, bench_ms, exp2_floor_ms, first_call_s, memory_floor_ms, run_configs,
                               saved_bytes, seconds_left, wall_ms)
from models import mamba
from models.mamba import MambaConfig, selective_scan_ref, selective_state_update_ref

ROLLED_FROM = 1024  # scan lengths traced through compiler.register_rolled instead of unrolled
EAGER_UP_TO = 2048  # the eager loop costs ~0.12 ms a step at d 1536: longer scans take seconds a call
ASSOCIATIVE_AT = (256, 2048, 8192)
MODEL_COMPILE_NEEDS_S = 150  # budget left below which the model's assoc-compile peer is skipped


# -- the scan as the peers write it ----------------------------------------------------------
@functools.cache
def rolled_scan():
    """selective_scan_ref registered with compiler.register_rolled. A wrapper is registered, not
    the function itself, so that other modules (the peers, tests) still see the plain loop."""
    return compiler.register_rolled(functools.wraps(selective_scan_ref)(
        lambda *args, **kwargs: selective_scan_ref(*args, **kwargs)))


def _combine(left, right):
    a_left, b_left = left
    a_right, b_right = right
    return a_left * a_right, a_right * b_left + b_right


def associative_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                               return_last_state=False):
    """selective_scan_ref's function as transformers' mamba_selective_scan computes it with
    use_associative_scan: discretise over the whole sequence, torch's associative_scan over L,
    a matmul readout in the input dtype."""
    # a private module, imported here: a torch without it loses this peer, not the suite
    from torch._higher_order_ops.associative_scan import associative_scan

    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    discrete_A = torch.exp(A[None, :, None, :] * delta[:, :, :, None])
    deltaB_u = delta[:, :, :, None] * B[:, None, :, :].float() * u[:, :, :, None].float()
    mode = "pointwise" if u.is_cuda else "generic"
    _, states = associative_scan(_combine, (discrete_A, deltaB_u), dim=2, combine_mode=mode)
    y = torch.matmul(states.transpose(1, 2).to(u.dtype), C.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    out = y if D is None else y + u * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(u.dtype)
    return (out, states[:, :, -1]) if return_last_state else out


class Scan(nn.Module):
    """Mamba's block call of a selective-scan function: z gate, D skip, delta_bias, softplus."""

    def __init__(self, scan=selective_scan_ref):
        super().__init__()
        self.scan = scan

    def forward(self, u, delta, A, B, C, D, z, delta_bias):
        return self.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)


class StateUpdate(nn.Module):
    """One decoding step, the state updated in place."""

    def forward(self, state, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)


@contextlib.contextmanager
def scan_in_models(fn):
    """Inside, models.mamba's blocks call `fn` for their selective scan."""
    with mock.patch.object(mamba, "selective_scan_ref", fn):
        yield


# -- configs and inputs ----------------------------------------------------------------------
def grid(quick: bool, headline: bool = False) -> list[dict]:
    """Scan rows first (issue 5's targets), then decode, then the model (the slowest row), then
    training (issue 15's). headline (benchmarks/gpu_check.py): one scan row and one decode row,
    a kernel each."""
    if quick:
        scans = [dict(op="scan", batch=1, dim=8, dstate=4, seqlen=length, loop=loop)
                 for length, loop in ((16, "unrolled"), (64, "rolled"))]
        decodes = [dict(op="decode", batch=batch, dim=8, dstate=4) for batch in (1, 2)]
        model = dict(op="model", model="mamba-tiny", batch=1, seqlen=16, loop="rolled")
        model_train = dict(op="model_train", model="mamba-tiny", batch=1, seqlen=16, loop="rolled")
        return [scans[1], decodes[0]] if headline else scans + decodes + [model, *training_grid(quick), model_train]
    scans = [dict(op="scan", batch=8, dim=1536, dstate=16, seqlen=length,
                  loop="rolled" if length >= ROLLED_FROM else "unrolled")
             for length in (256, 512, 1024, 2048, 4096, 8192)]
    decodes = [dict(op="decode", batch=batch, dim=1536, dstate=16) for batch in (1, 8, 64, 256)]
    model = dict(op="model", model="mamba-130m", batch=8, seqlen=2048, loop="rolled")
    if headline:
        return [scans[3], decodes[2]]  # L 2048, batch 64
    return scans + decodes + [model, *training_grid(quick), dict(op="model_train", model="mamba-130m", batch=8,
                                                                  seqlen=2048, loop="rolled")]


def training_grid(quick: bool) -> list[dict]:
    """The scan's fwd+bwd at Mamba-130M's size (benchmarks/gpu_check.py's training part runs it)."""
    if quick:
        return [dict(op="scan_train", batch=1, dim=8, dstate=4, seqlen=64, loop="rolled")]
    return [dict(op="scan_train", batch=8, dim=1536, dstate=16, seqlen=2048, loop="rolled")]


def _channel_params(dim: int, dstate: int, device) -> tuple:
    """A (d, n), D (d,), delta_bias (d,) in fp32 at Mamba's scales (softplus(bias) in [1e-3, 0.1])."""
    A = -torch.exp(0.5 * torch.randn(dim, dstate, device=device))
    D = torch.randn(dim, device=device)
    delta_bias = torch.log(torch.expm1(torch.empty(dim, device=device).uniform_(1e-3, 0.1)))
    return A, D, delta_bias


def scan_inputs(config: dict, device, dtype) -> tuple:
    """(u, delta, A, B, C, D, z, delta_bias)."""
    torch.manual_seed(0)
    b, d, n, L = config["batch"], config["dim"], config["dstate"], config["seqlen"]
    A, D, delta_bias = _channel_params(d, n, device)
    u, delta, z = (torch.randn(b, d, L, device=device, dtype=dtype) for _ in range(3))
    B, C = (torch.randn(b, n, L, device=device, dtype=dtype) for _ in range(2))
    return u, 0.5 * delta, A, B, C, D, z, delta_bias


def decode_inputs(config: dict, device, dtype) -> tuple:
    """(state, x, dt, A, B, C, D, z, dt_bias)."""
    torch.manual_seed(0)
    b, d, n = config["batch"], config["dim"], config["dstate"]
    A, D, dt_bias = _channel_params(d, n, device)
    state = torch.randn(b, d, n, device=device, dtype=dtype)
    x, dt, z = (torch.randn(b, d, device=device, dtype=dtype) for _ in range(3))
    B, C = (torch.randn(b, n, device=device, dtype=dtype) for _ in range(2))
    return state, x, 0.5 * dt, A, B, C, D, z, dt_bias


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fired(compiled, count: int = 1) -> str:
    found = compiled.patterns.count("ssm_scan")
    return "" if found == count else f"ssm_scan fused {found} of {count} scans; "


def _seconds(value: float | None) -> str:
    return "failed" if value is None else f"{value:.1f} s"


# -- measurements ----------------------------------------------------------------------------
def measure_scan(config: dict, device, dtype) -> Row:
    args = scan_inputs(config, device, dtype)
    compiled = compiler.compile(Scan(rolled_scan() if config["loop"] == "rolled" else selective_scan_ref))
    eager, u, length = Scan(), args[0], config["seqlen"]
    peers = {}
    with torch.no_grad():
        capture_s = first_call_s(lambda: compiled(*args))
        ours = bench_ms(lambda: compiled(*args))
        peers["eager"] = bench_ms(lambda: eager(*args)) if length <= EAGER_UP_TO else None
        peers["assoc-compile"] = None
        if device.type == "cuda" and length in ASSOCIATIVE_AT:
            associative = torch.compile(Scan(associative_selective_scan))
            peers["assoc-compile"] = bench_ms(lambda: associative(*args))
    peers["memory floor"] = memory_floor_ms(_nbytes(args) + _nbytes([u]))
    peers["exp2 floor"] = exp2_floor_ms(u.numel() * config["dstate"])
    notes = f"{_fired(compiled)}ours' first call {_seconds(capture_s)}"
    if device.type == "cuda" and length in ASSOCIATIVE_AT and peers["assoc-compile"] is None:
        notes += "; assoc-compile failed"
    return Row("ssm_scan", config, ours, peers, notes=notes)


def measure_decode(config: dict, device, dtype) -> Row:
    args = decode_inputs(config, device, dtype)
    compiled = compiler.compile(StateUpdate())
    peers = {"eager": StateUpdate()}
    if device.type == "cuda":
        peers["torch.compile"] = torch.compile(StateUpdate())
    with torch.no_grad():
        ours = bench_ms(lambda: compiled(*args))
        peer_ms = {name: bench_ms(lambda fn=fn: fn(*args)) for name, fn in peers.items()}
    state, x = args[:2]
    peer_ms["memory floor"] = memory_floor_ms(_nbytes(args) + _nbytes([state, x]))
    return Row("ssm_scan", config, ours, peer_ms, notes=_fired(compiled).rstrip("; "))


def _gradients(fn, args: tuple, dout: torch.Tensor):
    """fn's forward and backward: the gradient of every floating input for output gradient dout."""
    leaves = [a for a in args if a is not None and a.requires_grad]
    return torch.autograd.grad(fn(*args), leaves, dout)


def measure_scan_train(config: dict, device, dtype) -> Row:
    args = tuple(a.requires_grad_() for a in scan_inputs(config, device, dtype))
    u, length = args[0], config["seqlen"]
    dout = torch.randn_like(u)
    compiled = compiler.compile(Scan(rolled_scan() if config["loop"] == "rolled" else selective_scan_ref))
    peers = {}
    capture_s = first_call_s(lambda: _gradients(compiled, args, dout))
    ours = bench_ms(lambda: _gradients(compiled, args, dout))
    peers["eager"] = wall_ms(lambda: _gradients(Scan(), args, dout)) if length <= EAGER_UP_TO else None
    peers["assoc-compile"] = None
    if device.type == "cuda":
        associative = torch.compile(Scan(associative_selective_scan))
        peers["assoc-compile"] = bench_ms(lambda: _gradients(associative, args, dout))
    peers["memory floor"] = memory_floor_ms(2 * _nbytes(args) + 2 * _nbytes([u]) + _nbytes(args))
    peers["exp2 floor"] = exp2_floor_ms(2 * u.numel() * config["dstate"])
    report = compiled.report()
    notes = f"{_fired(compiled)}ours' first call {_seconds(capture_s)}"
    notes += "; the backward fell back to PyTorch" if "ran in PyTorch" in report else ""
    if device.type == "cuda" and peers["assoc-compile"] is None:
        notes += "; assoc-compile failed"
    return Row("ssm_scan", config, ours, peers, notes=notes)


def _model(config: dict, device, dtype):
    sizes = MambaConfig.tiny() if config["model"] == "mamba-tiny" else MambaConfig.mamba_130m()
    model, (ids,) = mamba.example(sizes, config["batch"], config["seqlen"])
    return model.to(device, dtype), ids.to(device), sizes.n_layer


def measure_model(config: dict, device, dtype) -> Row:
    model, ids, layers = _model(config, device, dtype)
    peers, notes = {}, []
    with torch.no_grad(), scan_in_models(rolled_scan()):
        compiled = compiler.compile(model)
        capture_s = first_call_s(lambda: compiled(ids))
        ours = bench_ms(lambda: compiled(ids))
    notes.append(f"{_fired(compiled, layers)}ours' first call {_seconds(capture_s)}")
    with torch.no_grad():
        peers["eager"] = wall_ms(lambda: model(ids))
    peers["assoc-compile"] = None
    if device.type == "cuda" and seconds_left() > MODEL_COMPILE_NEEDS_S:
        with torch.no_grad(), scan_in_models(associative_selective_scan):
            associative = torch.compile(model)
            compile_s = first_call_s(lambda: associative(ids))
            peers["assoc-compile"] = bench_ms(lambda: associative(ids))
        notes.append(f"assoc-compile first call {_seconds(compile_s)}")
    elif device.type == "cuda":
        notes.append("assoc-compile not run: too little of the time budget left")
    notes.append("torch.compile of the unrolled loop not run (capture takes many minutes at L >= 1024)")
    return Row("ssm_scan", config, ours, peers, notes="; ".join(notes))


def _training_step(model, ids):
    """Forward, next-token cross-entropy and backward: the gradient of every parameter."""
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def measure_model_train(config: dict, device, dtype) -> Row:
    model, ids, layers = _model(config, device, dtype)
    model.train()
    peers, notes = {}, []
    with scan_in_models(rolled_scan()):
        compiled = compiler.compile(model)
        capture_s = first_call_s(lambda: _training_step(compiled, ids))
        ours = bench_ms(lambda: _training_step(compiled, ids))
    notes.append(f"{_fired(compiled, layers)}ours' first call {_seconds(capture_s)}")
    fell_back = sorted({line.split(" ran in PyTorch")[0].split()[0] for line in compiled.report().splitlines()
                        if "ran in PyTorch" in line})
    notes += [f"ran in PyTorch: {', '.join(fell_back)}"] if fell_back else []
    peers["assoc-compile"] = None
    if device.type == "cuda" and seconds_left() > MODEL_COMPILE_NEEDS_S:
        with scan_in_models(associative_selective_scan):
            associative = torch.compile(model)
            compile_s = first_call_s(lambda: _training_step(associative, ids))
            peers["assoc-compile"] = bench_ms(lambda: _training_step(associative, ids))
        notes.append(f"assoc-compile first call {_seconds(compile_s)}")
    elif device.type == "cuda":
        notes.append("assoc-compile not run: too little of the time budget left")
    return Row("ssm_scan", config, ours, peers, notes="; ".join(notes))


MEASURE = {"scan": measure_scan, "decode": measure_decode, "model": measure_model, "scan_train": measure_scan_train,
           "model_train": measure_model_train}


def run(quick: bool, device: torch.device, headline: bool = False, training: bool = False) -> list[Row]:
    """The suite's rows; headline: gpu_check's forward configs; training: only its fwd+bwd ones."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = training_grid(quick) if training else grid(quick, headline)
    return run_configs("ssm_scan", configs, lambda config: MEASURE[config["op"]](config, device, dtype))


# -- memory saved for the backward ------------------------------------------------------------

def saved_memory(quick: bool) -> list[dict]:
    """Bytes saved for the backward by the scan (Mamba-130M's sizes, bf16, L 2048 and 8192) and
    by the Mamba-130M-like LM's training forward (batch 8, L 2048), ours against eager's loop:
    {"family", "config", "ours_bytes", "peers_bytes": {"eager": ...}, "inputs_bytes" (the scan's
    operands; None for the model), "notes"}.

    Measured on the meta device: flashfx's ops run their fake kernels there, which return what the
    real ones save (the operands and one fp32 state per CHUNK_LEN steps), and eager's loop keeps its
    per-step tensors; no data is computed, so the table needs no GPU (~1 min for the model row)."""
    meta = torch.device("meta")
    if quick:
        scans = [dict(op="scan", batch=1, dim=8, dstate=4, seqlen=600)]
        model = dict(op="model", model="mamba-tiny", batch=1, seqlen=16)
    else:
        scans = [dict(op="scan", batch=8, dim=1536, dstate=16, seqlen=length) for length in (2048, 8192)]
        model = dict(op="model", model="mamba-130m", batch=8, seqlen=2048)
    rows = []
    for config in scans:
        args = tuple(a.requires_grad_() for a in scan_inputs(config, meta, torch.bfloat16))
        compiled = compiler.compile(Scan(rolled_scan()))
        rows.append(dict(family="ssm_scan", config=config, ours_bytes=saved_bytes(lambda: compiled(*args)),
                         peers_bytes={"eager": saved_bytes(lambda: Scan()(*args))}, inputs_bytes=_nbytes(args),
                         notes=_fired(compiled).rstrip("; ")))
    sizes = MambaConfig.tiny() if model["model"] == "mamba-tiny" else MambaConfig.mamba_130m()
    lm, (ids,) = mamba.example(sizes, model["batch"], model["seqlen"])
    lm = lm.train().to(meta, torch.bfloat16)
    with scan_in_models(rolled_scan()):
        compiled = compiler.compile(lm)
        ours = saved_bytes(lambda: compiled(ids.to(meta)))
    rows.append(dict(family="ssm_scan", config=model, ours_bytes=ours,
                     peers_bytes={"eager": saved_bytes(lambda: lm(ids.to(meta)))},
                     inputs_bytes=None, notes=_fired(compiled, sizes.n_layer).rstrip("; ")))
    return rows

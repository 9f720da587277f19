"""Training through the long and short convolutions: forward and backward, ours against the peers.

    long    H3's fftconv_ref (filter k and skip D as parameters), H 768, bf16:
            B 8 at L 2048 (H3's length), B 2 at L 16384
    short   Mamba's silu(conv1d(x, w, b, padding=3, groups=H)[..., :L]), B 8, H 1536, L 2048, bf16
    model   a Hyena-150M training step: forward, cross-entropy, backward; B 8, L 2048, bf16

    ours           compiler.compile of the module: flashfx's forward and backward kernels, the rest
                   through Inductor on CUDA
    eager          the module in PyTorch: torch.fft or F.conv1d (cuDNN), and autograd
    torch.compile  Inductor on the same module, forward and backward (it sends FFTs back to eager)

One timed call is a forward and the gradients of every input and parameter for a fixed output
gradient (the model: of its loss, for its parameters), by torch.autograd.grad, so nothing
accumulates between calls. Targets (issue 15): long >= 5x eager, short >= 3x eager, the Hyena
step >= 1.0x torch.compile. Rate: the bytes the fused kernels must move at least, u in and y out
forward, u and dy in and du out backward (the filter's, weight's and gates' traffic not counted).
The notes say when a pattern did not fuse or an op of ours ran in PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import compiler
from benchmarks.common import Row, bench_ms, run_configs
from benchmarks.long_conv import FFTConv, ShortConv
from models import hyena

HEADLINE = {False: [dict(op="long", batch=8, channels=768, seqlen=2048)],  # benchmarks/gpu_check.py
            True: [dict(op="long", batch=1, channels=8, seqlen=64)]}
PATTERN = {"long": "long_conv", "short": "short_conv", "model": "long_conv"}


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """headline (benchmarks/gpu_check.py): the long convolution at L 2048."""
    if headline:
        return HEADLINE[quick]
    if quick:
        return [*HEADLINE[quick], dict(op="short", batch=1, channels=8, seqlen=64),
                dict(op="model", model="hyena-tiny", batch=1, seqlen=32)]
    return [*HEADLINE[quick], dict(op="long", batch=2, channels=768, seqlen=16384),
            dict(op="short", batch=8, channels=1536, seqlen=2048),
            dict(op="model", model="hyena-150m", batch=8, seqlen=2048)]


def _workload(config: dict, device, dtype):
    """(module in dtype on device, step(module) -> a call to time, work for the rate)."""
    torch.manual_seed(0)
    if config["op"] == "model":
        sizes = hyena.HyenaConfig.tiny() if config["model"] == "hyena-tiny" else hyena.HyenaConfig.hyena_150m()
        model, (ids,) = hyena.example(sizes, config["batch"], config["seqlen"] + 1)
        return model.to(device, dtype).train(), lambda model: _model_step(model, ids.to(device)), {}
    shape = (config["batch"], config["channels"], config["seqlen"])
    module = FFTConv(*shape[1:]) if config["op"] == "long" else ShortConv(shape[1])
    u = (torch.randn(shape, device=device, dtype=dtype) * 0.1).requires_grad_()
    grad = torch.randn(shape, device=device, dtype=dtype)
    work = {"bytes": 5 * u.numel() * u.element_size()}
    return module.to(device, dtype).train(), lambda module: _step(module, (u,), grad), work


def _step(module, inputs, grad):
    """One forward and the gradients of the inputs and parameters."""
    leaves = [*inputs, *module.parameters()]

    def step():
        out = module(*inputs)
        return torch.autograd.grad(out, leaves, grad)
    return step


def _model_step(model, ids):
    """One forward, the loss and the parameters' gradients of a language model."""
    params = list(model.parameters())

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        return torch.autograd.grad(loss, params)
    return step


def _notes(compiled, pattern: str) -> str:
    """Whether the pass fired, and every op of ours that ran in PyTorch."""
    if pattern not in compiled.patterns:
        return f"{pattern} pass did not fire"
    return "; ".join(line.strip() for line in compiled.report().splitlines() if "ran in PyTorch" in line)[:300]


def measure(config: dict, device, dtype) -> Row:
    module, step, work = _workload(config, device, dtype)
    compiled = compiler.compile(module)
    peers = {"eager": module, **({"torch.compile": torch.compile(module)} if device.type == "cuda" else {})}
    ours = bench_ms(step(compiled))
    peer_ms = {name: bench_ms(step(peer)) for name, peer in peers.items()}
    return Row("conv_training", config, ours, peer_ms, work=work, notes=_notes(compiled, PATTERN[config["op"]]))


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return run_configs("conv_training", grid(quick, headline), lambda config: measure(config, device, dtype))

"""Training through attention (issue 14): forward + backward on the FlashAttention-2 paper's grid, and a
GPT-2 small training step, ours against the peers.

attention   the grid of benchmarks/attention.py (16k tokens, heads * head dim = 2048, head dim 64 and
            128, L 512..16k, causal and not, bf16), two rows per config:
                pass=fwd+bwd   out = attention(q, k, v); autograd.grad(out, (q, k, v), dout)
                pass=bwd       autograd.grad alone, the forward's graph retained
            FLOPs: forward F = 4 B H L^2 d (halved when causal), backward 2.5 F (FlashAttention-2's count:
            five matmuls to the forward's two), fwd+bwd 3.5 F.
                ours            compiler.compile(F.scaled_dot_product_attention module) on inputs that
                                require grad: the FA2 forward with lse, the dq and dkdv kernels
                sdpa-flash      SDPA restricted to its FlashAttention-2 backend
                sdpa-cudnn      SDPA restricted to cuDNN
                sdpa-efficient  SDPA restricted to memory-efficient attention
                flex            FlexAttention under torch.compile (causal via a block mask), its backward
gpt2-small  models.gpt's GPT-2 small (SDPA causal attention, no dropout), vocabulary 8192, batch 8,
            L 1024 (and 4096): one step = forward, cross-entropy, backward (the optimizer step is
            the same for everyone and left out); the notes give each peak memory in GiB.
                ours            compiler.compile(model): flashfx's kernels, the rest through Inductor
                torch.compile   Inductor, default mode
                eager           the model in PyTorch

Targets (the issue): at least 1.0x sdpa-flash's backward everywhere, 0.9x sdpa-cudnn's at L >= 2k,
1.0x torch.compile on the training step. headline=True (benchmarks/gpu_check.py): head dim 128, L 4k,
causal, both passes, and GPT-2 small at L 1024 (quick: tiny sizes on the CPU interpreter).
"""
from __future__ import annotations

import torch

import compiler
from benchmarks.attention import SdpaModule, flops, grid as forward_grid, peers as forward_peers
from benchmarks.common import Row, bench_ms, first_call_s, run_configs
from benchmarks.end_to_end import VOCAB
from models import gpt

PASSES = {"fwd+bwd": 3.5, "bwd": 2.5}  # FLOPs as a multiple of the forward's


def grid(quick: bool, headline: bool = False) -> list[dict]:
    attention = [dict(config, **{"pass": name}) for config in forward_grid(quick) for name in PASSES]
    if headline:
        length = 128 if quick else 4096
        attention = [config for config in attention if config["seqlen"] == length and config["causal"]
                     and config["head_dim"] == (32 if quick else 128)]
    lengths = [64] if quick else ([1024] if headline else [1024, 4096])
    models = [dict(model="gpt2-small", batch=1 if quick else 8, seqlen=length) for length in lengths]
    return attention + models


def _training_step(run, inputs, dout):
    """fwd+bwd of `run(*inputs)` as one call."""
    def step():
        return torch.autograd.grad(run(*inputs), inputs, dout)
    return step


def _backward(run, inputs, dout):
    """The backward alone: the forward's graph is built once and retained."""
    out = run(*inputs)
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def measure_attention(config: dict, device, dtype) -> Row:
    shape = (config["batch"], config["heads"], config["seqlen"], config["head_dim"])
    inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    dout = torch.randn(shape, device=device, dtype=dtype)
    compiled = compiler.compile(SdpaModule(config["causal"]))
    timed = _training_step if config["pass"] == "fwd+bwd" else _backward
    peers = {name: fn for name, fn in forward_peers(config, device, headline=True).items()}
    ours = bench_ms(timed(compiled, inputs, dout))
    peer_ms = {name: bench_ms(timed(fn, inputs, dout)) for name, fn in peers.items()}
    fused = "attention" in compiled.patterns and "ran in PyTorch" not in compiled.report()
    return Row("attention_training", config, ours, peer_ms, work={"flops": PASSES[config["pass"]] * flops(config)},
               notes="" if fused else f"not all in flashfx kernels: {compiled.report()}"[:300])


def _peak_gib(step, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def measure_model(config: dict, device, dtype, quick: bool) -> Row:
    torch.manual_seed(0)
    sizes = (gpt.GPTConfig.tiny(attention="sdpa") if quick
             else gpt.GPTConfig.gpt2_small(attention="sdpa", vocab_size=VOCAB, block_size=config["seqlen"]))
    model = gpt.GPT(sizes).to(device, dtype).train()
    ids = torch.randint(0, sizes.vocab_size, (config["batch"], config["seqlen"] + 1), device=device)
    runs = {"ours": compiler.compile(model), "eager": model}
    if device.type == "cuda":
        runs["torch.compile"] = torch.compile(model)

    def step(run):
        def train():
            logits = run(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            return torch.autograd.grad(loss, list(model.parameters()))
        return train

    first_s = {name: first_call_s(step(run)) for name, run in runs.items() if name != "eager"}
    times = {name: bench_ms(step(run)) for name, run in runs.items()}
    peaks = {name: _peak_gib(step(run), device) for name, run in runs.items()}
    fused = runs["ours"].patterns.count("attention")
    notes = [f"attention fused in {fused} of {sizes.n_layer} layers"] if fused != sizes.n_layer else []
    notes.append("first calls: " + ", ".join(f"{name} {s:.1f} s" for name, s in first_s.items() if s is not None))
    if device.type == "cuda":
        notes.append("peak GiB: " + ", ".join(f"{name} {gib:.2f}" for name, gib in peaks.items() if gib is not None))
    return Row("attention_training", config, times.pop("ours"), times, notes="; ".join(notes))


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def measure(config: dict) -> Row:
        if "model" in config:
            return measure_model(config, device, dtype, quick)
        return measure_attention(config, device, dtype)

    return run_configs("attention_training", grid(quick, headline), measure)

"""Whole transformer language models, forward, ours against eager and torch.compile (issue 3 item 4).

    gpt2-small   models.gpt's GPT-2 small (12 layers, 12 heads, d 768, GELU MLP, SDPA causal
                 attention), vocabulary 8192 (as the anchors' GPT-2 row), positions up to 4096
    llama-gqa    Hugging Face LlamaForCausalLM at GPT-2-small size: 12 layers, d 768, 12 query
                 heads and 4 key/value heads, SwiGLU ffn 2048, RoPE, RMSNorm, vocabulary 8192,
                 SDPA attention; logits out
    batch 8, L 1024 and 4096, bf16, random init

    ours           compiler.compile(model): flashfx's kernels, the rest through Inductor on CUDA
    eager rest     compiler.compile(model, inductor=False): flashfx's kernels, the rest eager (CUDA only)
    eager          the model in PyTorch
    torch.compile  Inductor, default mode (CUDA only)

The notes give ours' and torch.compile's first call (capture and compilation) in seconds, and
whether ours fused one attention per layer. H3-125M and Hyena-150M (L 2K and 8K) are in
long_conv.py, Mamba-130M in ssm_scan.py, an OPT-6.7B-like layer in sparse_mlp.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import compiler
from benchmarks.common import Row, bench_ms, first_call_s, run_configs
from models import gpt

VOCAB = 8192


class Logits(nn.Module):
    """A Hugging Face causal LM called with token ids, returning its logits (no KV cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def gpt2_small(tiny: bool, max_length: int) -> tuple[nn.Module, int]:
    """(model, layers)."""
    sizes = (gpt.GPTConfig.tiny(attention="sdpa") if tiny
             else gpt.GPTConfig.gpt2_small(attention="sdpa", vocab_size=VOCAB, block_size=max_length))
    return gpt.GPT(sizes), sizes.n_layer


def llama_gqa(tiny: bool, max_length: int) -> tuple[nn.Module, int]:
    """(model, layers)."""
    import transformers

    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=96) if tiny else \
        dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048,
             num_hidden_layers=12, vocab_size=VOCAB)
    config = transformers.LlamaConfig(max_position_embeddings=max_length, attn_implementation="sdpa", **sizes)
    return Logits(transformers.LlamaForCausalLM(config)), sizes["num_hidden_layers"]


MODELS = {"gpt2-small": gpt2_small, "llama-gqa": llama_gqa}


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """headline (benchmarks/gpu_check.py): GPT-2 small at L 1024, the anchors' row."""
    if quick:
        configs = [dict(model=name, batch=1, seqlen=64) for name in MODELS]
    else:
        configs = [dict(model=name, batch=8, seqlen=length) for length in (1024, 4096) for name in MODELS]
    return configs[:1] if headline else configs


def _seconds(value: float | None) -> str:
    return "failed" if value is None else f"{value:.1f} s"


def measure(config: dict, device, dtype, quick: bool) -> Row:
    torch.manual_seed(0)
    model, layers = MODELS[config["model"]](quick, config["seqlen"])
    model = model.to(device, dtype).eval()
    ids = torch.randint(0, 96 if quick else VOCAB, (config["batch"], config["seqlen"]), device=device)
    compiled = compiler.compile(model)
    peers = {"eager": model}
    if device.type == "cuda":
        peers["torch.compile"] = torch.compile(model)
        peers["eager rest"] = compiler.compile(model, inductor=False)
    with torch.no_grad():
        first_s = {"ours": first_call_s(lambda: compiled(ids))}
        for name in ("torch.compile", "eager rest"):
            if name in peers:
                first_s[name] = first_call_s(lambda name=name: peers[name](ids))
        ours = bench_ms(lambda: compiled(ids))
        peer_ms = {name: bench_ms(lambda fn=fn: fn(ids)) for name, fn in peers.items()}
    fused = compiled.patterns.count("attention")
    notes = "" if fused == layers else f"attention fused in {fused} of {layers} layers; "
    notes += "first calls: " + ", ".join(f"{name} {_seconds(s)}" for name, s in first_s.items())
    return Row("end_to_end", config, ours, peer_ms, notes=notes)


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return run_configs("end_to_end", grid(quick, headline), lambda config: measure(config, device, dtype, quick))

"""Whole language models, forward, ours against eager and torch.compile (issue 3 item 4, issue 19 item 7).

    gpt2-small   models.gpt's GPT-2 small (12 layers, 12 heads, d 768, GELU MLP, SDPA causal
                 attention), vocabulary 8192 (as the anchors' GPT-2 row), positions up to 4096
    llama-gqa    Hugging Face LlamaForCausalLM at GPT-2-small size: 12 layers, d 768, 12 query
                 heads and 4 key/value heads, SwiGLU ffn 2048, RoPE, RMSNorm, vocabulary 8192,
                 SDPA attention; logits out
    h3-125m      models.h3's H3-125M (12 layers, d 768, a long convolution per layer)
    hyena-150m   models.hyena's Hyena-150M (18 layers, d 864, implicit filters up to 8K steps)
    mamba-130m   models.mamba's Mamba-130M (24 layers, d 768, the selective scan as mamba_ssm's
                 selective_scan_ref): ours keeps the scan loop rolled (compiler.register_rolled),
                 torch.compile runs the associative_scan form (its unrolled loop at L 1K-4K takes many
                 minutes to capture), eager the loop
    batch 8, L 1024 and 4096, bf16, random init

    ours           compiler.compile(model): flashfx's kernels, the rest through Inductor on CUDA
    eager rest     compiler.compile(model, inductor=False): flashfx's kernels, the rest eager (CUDA only)
    eager          the model in PyTorch
    torch.compile  Inductor, default mode (CUDA only)

The notes give ours' and torch.compile's first call (capture and compilation) in seconds, and
whether ours fused every layer's op. long_conv.py and ssm_scan.py also run H3, Hyena and Mamba at
L 2K and 8K; sparse_mlp.py an OPT-6.7B-like layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

import compiler
from benchmarks.common import Row, bench_ms, first_call_s, run_configs, wall_ms
from benchmarks.ssm_scan import associative_selective_scan, rolled_scan, scan_in_models
from models import gpt, h3, hyena, mamba

VOCAB = 8192


class Logits(nn.Module):
    """A Hugging Face causal LM called with token ids, returning its logits (no KV cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


@dataclass
class Model:
    """A model to time: its module, its layers and the ops of `pattern` ours must fuse in each, its
    vocabulary, and the context each runner calls it in (the Mamba's scan function: rolled for ours,
    parallel for Inductor)."""

    module: nn.Module
    layers: int
    pattern: str = "attention"
    per_layer: int = 1
    slow_eager: bool = False  # eager's Python loop over time: timed by one wall-clock call, not do_bench
    vocab: int = VOCAB
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] = field(default_factory=dict)

    def context(self, runner: str) -> contextlib.AbstractContextManager:
        return self.contexts.get(runner, contextlib.nullcontext)()


def gpt2_small(tiny: bool, max_length: int) -> Model:
    sizes = (gpt.GPTConfig.tiny(attention="sdpa") if tiny
             else gpt.GPTConfig.gpt2_small(attention="sdpa", vocab_size=VOCAB, block_size=max_length))
    return Model(gpt.GPT(sizes), sizes.n_layer, vocab=sizes.vocab_size)


def llama_gqa(tiny: bool, max_length: int) -> Model:
    import transformers

    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=96) if tiny else \
        dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048,
             num_hidden_layers=12, vocab_size=VOCAB)
    config = transformers.LlamaConfig(max_position_embeddings=max_length, attn_implementation="sdpa", **sizes)
    return Model(Logits(transformers.LlamaForCausalLM(config)), sizes["num_hidden_layers"], vocab=sizes["vocab_size"])


def h3_125m(tiny: bool, max_length: int) -> Model:
    sizes = h3.H3Config.tiny() if tiny else h3.H3Config.h3_125m()
    return Model(h3.H3LM(sizes), sizes.n_layer, "long_conv", per_layer=2, vocab=sizes.vocab_size)  # shift and diagonal


def hyena_150m(tiny: bool, max_length: int) -> Model:
    sizes = hyena.HyenaConfig.tiny() if tiny else hyena.HyenaConfig.hyena_150m()
    return Model(hyena.HyenaLM(sizes), sizes.n_layer, "long_conv", vocab=sizes.vocab_size)


def mamba_130m(tiny: bool, max_length: int) -> Model:
    sizes = mamba.MambaConfig.tiny() if tiny else mamba.MambaConfig.mamba_130m()
    return Model(mamba.MambaLM(sizes), sizes.n_layer, "ssm_scan", vocab=sizes.vocab_size, slow_eager=True,
                 contexts={"ours": lambda: scan_in_models(rolled_scan()),
                           "torch.compile": lambda: scan_in_models(associative_selective_scan)})


MODELS = {"gpt2-small": gpt2_small, "llama-gqa": llama_gqa, "h3-125m": h3_125m, "hyena-150m": hyena_150m,
          "mamba-130m": mamba_130m}


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
    model = MODELS[config["model"]](quick, config["seqlen"])
    module = model.module.to(device, dtype).eval()
    ids = torch.randint(0, model.vocab, (config["batch"], config["seqlen"]), device=device)
    runners = {"ours": compiler.compile(module), "eager": module}
    if device.type == "cuda":
        runners["torch.compile"] = torch.compile(module)
        runners["eager rest"] = compiler.compile(module, inductor=False)
    first_s, ms = {}, {}
    with torch.no_grad():
        for name, runner in runners.items():
            with model.context("ours" if name == "eager rest" else name):
                if name != "eager":
                    first_s[name] = first_call_s(lambda: runner(ids))
                slow = name == "eager" and model.slow_eager
                ms[name] = wall_ms(lambda: runner(ids)) if slow else bench_ms(lambda: runner(ids))
    fused, expected = runners["ours"].patterns.count(model.pattern), model.layers * model.per_layer
    notes = "" if fused == expected else f"{fused} of {expected} {model.pattern} ops fused; "
    notes += "first calls: " + ", ".join(f"{name} {_seconds(s)}" for name, s in first_s.items())
    ours = ms.pop("ours")
    return Row("end_to_end", config, ours, ms, notes=notes)


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return run_configs("end_to_end", grid(quick, headline), lambda config: measure(config, device, dtype, quick))

"""Hugging Face GPT-2 and Llama (random init, tiny configs) compile with one attention op per layer."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import compiler  # noqa: E402
from tests.numerics import assert_close_by_rule  # noqa: E402

LAYERS = 2


def gpt2(implementation: str):
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=64, n_head=4, vocab_size=128, n_positions=256,
                                     attn_implementation=implementation)
    return transformers.GPT2LMHeadModel(config)


def llama(implementation: str):
    config = transformers.LlamaConfig(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                      max_position_embeddings=256, attn_implementation=implementation)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("factory", [gpt2, llama], ids=["gpt2", "llama"])
def test_hf_causal_lm(factory, implementation):
    torch.manual_seed(0)
    model = factory(implementation).eval()
    ids = torch.randint(0, 128, (2, 37))
    compiled = compiler.compile(model, strict=True)
    with torch.no_grad():
        ours = compiled(ids).logits
        baseline = model(ids).logits
        reference = model.double()(ids).logits
    assert compiled.patterns.count("attention") == LAYERS, compiled.report()
    assert_close_by_rule(ours, baseline, reference)

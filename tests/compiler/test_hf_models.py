"""Hugging Face models (random init, tiny configs) compile with one attention op per layer.

GPT-2 and Llama in both attention implementations, and a spread of other architectures whose
eager attention is spelled differently: Falcon's in-place scale, GPT-NeoX, OPT's pre-scaled
query, Mistral's MQA, BERT's padding mask (an additive bias built from the input), GPT-Neo's causal where
followed by the padding bias (two masks), BLOOM's ALiBi bias from baddbmm on (b*h, L, L) scores
regrouped to (b, h, L, L) for the causal mask, Gemma 2's logit soft-capping (tanh) before the mask,
XLM's in-place masked_fill_ statement with a mask expanded as the scores."""
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


SIZES = dict(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4, vocab_size=128)


def falcon(implementation: str):
    return transformers.FalconForCausalLM(transformers.FalconConfig(**SIZES, attn_implementation=implementation))


def gpt_neox(implementation: str):
    config = transformers.GPTNeoXConfig(**SIZES, intermediate_size=128, attn_implementation=implementation)
    return transformers.GPTNeoXForCausalLM(config)


def opt(implementation: str):
    config = transformers.OPTConfig(**SIZES, ffn_dim=128, word_embed_proj_dim=64, attn_implementation=implementation)
    return transformers.OPTForCausalLM(config)


def mistral(implementation: str):
    config = transformers.MistralConfig(**SIZES, num_key_value_heads=1, intermediate_size=128,
                                        attn_implementation=implementation)
    return transformers.MistralForCausalLM(config)


def gpt_neo(implementation: str):
    config = transformers.GPTNeoConfig(num_layers=LAYERS, hidden_size=64, num_heads=4, vocab_size=128,
                                       attention_types=[[["global", "local"], 1]], window_size=16,
                                       attn_implementation=implementation)
    return transformers.GPTNeoForCausalLM(config)


def bloom(implementation: str):
    config = transformers.BloomConfig(n_layer=LAYERS, hidden_size=64, n_head=4, vocab_size=128,
                                      attn_implementation=implementation)
    return transformers.BloomForCausalLM(config)


def bert(implementation: str):
    config = transformers.BertConfig(**SIZES, intermediate_size=128, attn_implementation=implementation)
    return transformers.BertModel(config)


def gemma2(implementation: str):
    config = transformers.Gemma2Config(**SIZES, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                       attn_implementation=implementation)
    return transformers.Gemma2ForCausalLM(config)


def xlm(implementation: str):
    config = transformers.XLMConfig(emb_dim=64, n_layers=LAYERS, n_heads=4, vocab_size=128,
                                    attn_implementation=implementation)
    return transformers.XLMModel(config)


def outputs(model, ids, mask):
    result = model(ids, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


CONFIGURATIONS = [(factory, implementation) for factory in (gpt2, llama, falcon, gpt_neox, opt, mistral, bert)
                  for implementation in ("eager", "sdpa")] + [(gpt_neo, "eager"), (bloom, "eager"),
                                                              (gemma2, "eager"), (xlm, "eager")]  # no SDPA path


@pytest.mark.parametrize("factory, implementation", CONFIGURATIONS,
                         ids=[f"{factory.__name__}-{implementation}" for factory, implementation in CONFIGURATIONS])
def test_hf_models(factory, implementation):
    torch.manual_seed(0)
    model = factory(implementation).eval()
    ids = torch.randint(0, 128, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: no query row is fully masked
    compiled = compiler.compile(model, strict=True)
    with torch.no_grad():
        ours = outputs(compiled, ids, mask)
        baseline = outputs(model, ids, mask)
        reference = outputs(model.double(), ids, mask)
    assert compiled.patterns.count("attention") == LAYERS, compiled.report()
    assert_close_by_rule(ours, baseline, reference)

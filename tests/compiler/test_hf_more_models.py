"""More Hugging Face architectures (random init, tiny configs, eager attention) fuse every attention
layer and obey the tolerance rule against fp64.

A breadth sweep beyond tests/compiler/test_hf_models.py, one model per way of spelling the scores:
QK-norm (Qwen3), partial rotary (Phi), sliding windows next to global layers (Gemma 3,
ModernBERT's local attention), interleaved rotary (Cohere), GPT-J's rotary, MPT's ALiBi, DeepSeek-V3's
multi-head latent attention, GPT-BigCode's MQA, DeBERTa-v2's disentangled relative bias, T5's learned
relative bias (unscaled, with cross-attention), ESM's rotary encoder, and images and audio: Swin's window
attention with its shifted-window mask, BEiT's relative position bias, SegFormer's spatially reduced
keys, Whisper's encoder. Text runs on 13 tokens, the second row right-padded.
"""
from __future__ import annotations

import copy

import pytest
import torch

import compiler
from tests.numerics import assert_close_by_rule

transformers = pytest.importorskip("transformers")

VOCAB = 100
SIZES = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, intermediate_size=128,
             attn_implementation="eager")
GPT = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, attn_implementation="eager")
SEQ2SEQ = dict(encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, attn_implementation="eager")
VISION = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8, attn_implementation="eager")


def built(model: str, config: str, **options):
    return lambda: getattr(transformers, model)(getattr(transformers, config)(**options))


MODELS = {  # name -> (factory, input kind, fused attention ops)
    "qwen3": (built("Qwen3ForCausalLM", "Qwen3Config", **SIZES, num_key_value_heads=2, head_dim=16), "text", 2),
    "phi": (built("PhiForCausalLM", "PhiConfig", **SIZES), "text", 2),
    "gemma3": (built("Gemma3ForCausalLM", "Gemma3TextConfig", **SIZES, num_key_value_heads=2, head_dim=16,
                     sliding_window=8, layer_types=["sliding_attention", "full_attention"]), "text", 2),
    "cohere": (built("CohereForCausalLM", "CohereConfig", **SIZES, num_key_value_heads=2), "text", 2),
    "gptj": (built("GPTJForCausalLM", "GPTJConfig", **GPT, rotary_dim=8), "text", 2),
    "mpt": (built("MptForCausalLM", "MptConfig", n_layers=2, d_model=64, n_heads=4, vocab_size=VOCAB,
                  attn_implementation="eager"), "text", 2),
    "deepseek_v3": (built("DeepseekV3ForCausalLM", "DeepseekV3Config", **SIZES, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=2),
                    "text", 2),
    "gpt_bigcode": (built("GPTBigCodeForCausalLM", "GPTBigCodeConfig", **GPT), "text", 2),
    "deberta_v2": (built("DebertaV2Model", "DebertaV2Config", **SIZES, relative_attention=True,
                         pos_att_type=["p2c", "c2p"], max_relative_positions=16, position_buckets=8), "text", 2),
    "esm": (built("EsmModel", "EsmConfig", **SIZES, pad_token_id=1, position_embedding_type="rotary"), "text", 2),
    "modernbert": (built("ModernBertModel", "ModernBertConfig", **SIZES, global_attn_every_n_layers=2,
                         local_attention=8, pad_token_id=0), "text", 2),
    "t5": (built("T5Model", "T5Config", num_layers=2, d_model=64, num_heads=4, d_kv=16, d_ff=128, vocab_size=VOCAB,
                 attn_implementation="eager"), "seq2seq", 6),
    "swin": (built("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                   num_heads=[2, 4], window_size=4, attn_implementation="eager"), "image", 2),
    "beit": (built("BeitModel", "BeitConfig", **VISION, use_relative_position_bias=True), "image", 2),
    "segformer": (built("SegformerModel", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                        hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                        mlp_ratios=[2, 2], attn_implementation="eager"), "image", 2),
    "whisper_encoder": (lambda: transformers.WhisperModel(transformers.WhisperConfig(
        **SEQ2SEQ, num_mel_bins=16, max_source_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)).get_encoder(), "audio", 2),
}


def inputs(kind: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if kind == "image":
        return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=generator))
    if kind == "audio":
        return dict(input_features=torch.randn(2, 16, 32, generator=generator))
    ids = torch.randint(3, VOCAB, (2, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding: no query row is fully masked
    return dict(input_ids=ids, attention_mask=mask) | (dict(decoder_input_ids=ids[:, :7]) if kind == "seq2seq" else {})


def outputs(model, arguments: dict) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    result = model(**{name: value.to(dtype) if value.is_floating_point() else value
                      for name, value in arguments.items()})
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("name", MODELS)
def test_more_hf_models_fuse_every_attention(name):
    factory, kind, fused = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    arguments = inputs(kind)
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    with torch.no_grad():
        ours = outputs(compiled, arguments)
        baseline, reference = outputs(model, arguments), outputs(copy.deepcopy(model).double(), arguments)
    assert compiled.patterns.count("attention") == fused, compiled.report()
    assert_close_by_rule(ours, baseline, reference)


def test_longformer_banded_attention_is_reported():
    """Longformer's sliding-chunk attention, scores assembled by writes into a buffer, is no form the
    attention pass reads: it runs as eager and report() names it (it was silent)."""
    torch.manual_seed(0)
    model = built("LongformerModel", "LongformerConfig", **SIZES, attention_window=4)().eval()
    compiled = compiler.compile(copy.deepcopy(model))
    arguments = inputs("text")
    with torch.no_grad():
        torch.testing.assert_close(outputs(compiled, arguments), outputs(model, arguments), rtol=1e-5, atol=1e-5)
    assert "banded or windowed attention" in compiled.report(), compiled.report()

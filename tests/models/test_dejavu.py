"""The DejaVu reference model (models/dejavu.py): configs, neuron selection, and the two sparse forms.

The gathered form act(x W1[idx]^T + b1[idx]) W2[:, idx]^T + b2 and the masked form
fc2(act(fc1(x)) * mask) must be the same function (checked in fp64); at density 1 both are the
dense MLP. The `gpu` test runs one OPT-6.7B-sized block in bf16.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.dejavu import (
    ACTIVATIONS,
    UP_ACTIVATIONS,
    DejaVuBlock,
    DejaVuConfig,
    DejaVuLM,
    example,
    gathered_mlp,
    masked_mlp,
    neuron_mask,
    select_neurons,
    tiny_gathered,
    tiny_masked,
)


def same_weights(config: DejaVuConfig, *forms: str, seed: int = 0) -> list[DejaVuLM]:
    """One fp64 model per form, all with the weights of the first."""
    torch.manual_seed(seed)
    models = [DejaVuLM(replace(config, form=form)).double().eval() for form in forms]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    return models


def test_configs_validate_and_size_k():
    assert DejaVuConfig.tiny().k == round(0.1 * 256)
    assert DejaVuConfig.tiny(density=1e-6).k == 1
    big = DejaVuConfig.opt_6_7b()
    assert (big.d_model, big.ffn, big.n_head, big.k) == (4096, 16384, 32, 1638)
    assert (DejaVuConfig.opt_1_3b().d_model, DejaVuConfig.opt_1_3b().ffn) == (2048, 8192)
    for bad in ({"form": "sparse"}, {"activation": "tanh"}, {"density": 0.0}, {"n_head": 5}):
        with pytest.raises(ValueError):
            DejaVuConfig.tiny(**bad)


@pytest.mark.parametrize("activation, bias", [("relu", True), ("gelu", False), ("gelu_tanh", True)])
def test_gathered_and_masked_forms_are_one_function(activation, bias):
    config = DejaVuConfig.tiny(activation=activation, bias=bias, density=0.15)
    gathered, masked, dense = same_weights(config, "gathered", "masked", "dense")
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        y_gathered, y_masked, y_dense = gathered(ids), masked(ids), dense(ids)
    torch.testing.assert_close(y_gathered, y_masked, rtol=1e-10, atol=1e-10)
    assert (y_gathered - y_dense).abs().max() > 1e-3, "15% of the neurons must change the output"


def test_full_density_is_the_dense_model():
    gathered, masked, dense = same_weights(DejaVuConfig.tiny(density=1.0), "gathered", "masked", "dense")
    ids = torch.randint(0, 96, (3, 7))
    with torch.no_grad():
        for model in (gathered, masked):
            torch.testing.assert_close(model(ids), dense(ids), rtol=1e-10, atol=1e-10)


def test_functional_forms_agree_with_a_unique_index_set():
    torch.manual_seed(1)
    x, w1, b1 = torch.randn(5, 33, dtype=torch.float64), torch.randn(65, 33, dtype=torch.float64), torch.randn(65, dtype=torch.float64)
    w2, b2 = torch.randn(33, 65, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    idx = torch.tensor([0, 7, 8, 64])
    mask = neuron_mask(idx, 65, x.dtype)
    assert mask.sum() == 4 and mask[idx].eq(1).all()
    w3, b3 = torch.randn(65, 33, dtype=torch.float64), torch.randn(65, dtype=torch.float64)
    for act in ACTIVATIONS.values():
        torch.testing.assert_close(gathered_mlp(x, w1, b1, w2, b2, idx, act), masked_mlp(x, w1, b1, w2, b2, mask, act))
        for up in ((w3, b3, UP_ACTIVATIONS["identity"]), (w3, None, UP_ACTIVATIONS["relu"])):  # gated, dReLU
            torch.testing.assert_close(gathered_mlp(x, w1, b1, w2, b2, idx, act, up),
                                       masked_mlp(x, w1, b1, w2, b2, mask, act, up))


def test_one_neuron_set_per_call_from_summed_probabilities():
    scores = torch.randn(2, 3, 40)
    idx = select_neurons(scores, 6)
    expected = scores.reshape(6, 40).sigmoid().sum(0).topk(6).indices.sort().values
    assert torch.equal(idx, expected)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.unique())


def test_predictor_reads_the_block_input():
    """DejaVu's lookahead: the MLP predictor sees x before attention, the MLP sees ln_2(x + attn)."""
    torch.manual_seed(0)
    block = DejaVuBlock(DejaVuConfig.tiny()).eval()
    seen = []
    block.mlp.predictor.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        block(x)
    assert len(seen) == 1 and seen[0] is x


def test_language_model_shapes_and_limits():
    model, (ids,) = tiny_gathered()
    assert model(ids).shape == (*ids.shape, 96)
    masked, (ids,) = tiny_masked()
    assert masked.blocks[0].mlp.form == "masked" and "form=masked" in repr(masked.blocks[0].mlp)
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.gpu
def test_opt_6_7b_block_bf16():
    torch.manual_seed(0)
    config = DejaVuConfig.opt_6_7b(n_layer=1)
    block = DejaVuBlock(config).cuda().to(torch.bfloat16).eval()
    x = torch.randn(4, 1, config.d_model, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_gathered = block(x)
        block.mlp.form = "masked"
        y_masked = block(x)
    assert y_gathered.shape == x.shape
    torch.testing.assert_close(y_gathered, y_masked, rtol=2e-2, atol=2e-2)


def test_example_is_deterministic():
    first, (ids,) = example(DejaVuConfig.tiny(), seed=3)
    second, (same_ids,) = example(DejaVuConfig.tiny(), seed=3)
    assert torch.equal(ids, same_ids)
    with torch.no_grad():
        torch.testing.assert_close(first(ids), second(ids))

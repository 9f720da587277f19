"""Calibration (compiler/sparsify.py): dense models become DejaVu-sparse.

On tiny random-init models: our DejaVu LM, our GPT (MLP module with a functional GELU), Hugging
Face OPT (fc1/fc2 inline in the decoder layer), a plain nn.Sequential MLP, and gated MLPs: a
ReLU-fied Hugging Face Llama (LlamaMLP, hidden_act "relu"), Meta's FeedForward (w1, w2, w3) and
TurboSparse's dReLU. The predictors must
recall the true top-k neurons well above chance (k / F), the sparsified model must run, equal the
dense model at density 1 and stay close to it at high density; a structure that cannot be
installed is reported, and a failed install leaves the model unchanged.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler import sparsify
from models.dejavu import DejaVuConfig, SparseMLP, example
from models.gpt import GPT, GPTConfig


def token_batches(vocab: int, n: int = 6, batch: int = 4, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(n)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def dense_and_sparse(model: nn.Module, batches, **options):
    """(a dense copy, the report) after sparsifying `model` in place."""
    dense = copy.deepcopy(model)
    return dense, sparsify(model, batches, progress=False, **options)


def test_dejavu_predictors_recall_well_above_chance():
    model, _ = example(DejaVuConfig.tiny(form="dense"))
    dense, report = dense_and_sparse(model, token_batches(96), density=0.1, steps=20)
    assert [layer.name for layer in report.layers] == ["blocks.0.mlp", "blocks.1.mlp"]
    for layer in report.layers:
        assert (layer.k, layer.ffn, layer.rank, layer.activation) == (26, 256, 16, "relu")
        assert layer.recall > 3 * layer.chance_recall, str(report)
        assert 0 < layer.output_error < 1
    assert all(block.mlp.form == "gathered" and block.mlp.k == 26 for block in model.blocks)
    ids = token_batches(96, n=1, seed=1)[0]
    with torch.no_grad():
        assert model(ids).shape == dense(ids).shape
    assert "blocks.0.mlp" in str(report) and "recall" in str(report)


@pytest.mark.parametrize("density, tolerance", [(1.0, 1e-5), (0.9, 0.05)])
def test_high_density_stays_close_to_the_dense_model(density, tolerance):
    model, _ = example(DejaVuConfig.tiny(form="dense"))
    dense, _ = dense_and_sparse(model, token_batches(96), density=density, steps=0)
    ids = token_batches(96, n=1, batch=1, length=4, seed=2)[0]
    with torch.no_grad():
        assert relative_error(model(ids), dense(ids)) < tolerance


def test_gathered_and_masked_installs_agree():
    gathered, _ = example(DejaVuConfig.tiny(form="dense", activation="gelu"))
    masked = copy.deepcopy(gathered)
    batches = token_batches(96)
    sparsify(gathered, batches, density=0.2, steps=10, progress=False, form="gathered")
    sparsify(masked, batches, density=0.2, steps=10, progress=False, form="masked")
    ids = token_batches(96, n=1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(gathered(ids), masked(ids), rtol=1e-4, atol=1e-5)
    assert masked.blocks[1].mlp.form == "masked"


def test_our_gpt_mlp_modules_are_replaced():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny()).eval()
    dense, report = dense_and_sparse(model, token_batches(96), density=0.1, steps=10)
    assert [layer.name for layer in report.layers] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(layer.activation == "gelu_tanh" and layer.recall > 3 * layer.chance_recall for layer in report.layers)
    assert isinstance(model.blocks[0].mlp, SparseMLP) and model.blocks[0].mlp.fc1 is model.blocks[0].mlp.fc1
    ids = token_batches(96, n=1, batch=1, length=8, seed=4)[0]
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_hugging_face_opt_decoder_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).eval()
    batches = [{"input_ids": ids} for ids in token_batches(96)]
    almost_dense = copy.deepcopy(model)
    dense, report = dense_and_sparse(model, batches, density=0.1, steps=10)
    assert [layer.name for layer in report.layers] == ["model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"]
    assert all(layer.recall > 3 * layer.chance_recall for layer in report.layers), str(report)
    layer = model.model.decoder.layers[0]
    assert isinstance(layer.fc1, SparseMLP) and isinstance(layer.fc2, nn.Identity)
    assert isinstance(layer.activation_fn, nn.Identity)
    sparsify(almost_dense, batches, density=0.9, steps=0, progress=False)
    ids = token_batches(96, n=1, batch=1, length=4, seed=5)[0]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
        assert relative_error(almost_dense(input_ids=ids).logits, dense(input_ids=ids).logits) < 0.1


def tiny_relu_llama() -> nn.Module:
    """Hugging Face's Llama with ReLU-fied MLPs (ReluLLaMA, PowerInfer's models), two layers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu",
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_relu_llama_gated_mlps_are_replaced():
    model = tiny_relu_llama()
    batches = [{"input_ids": ids} for ids in token_batches(96)]
    full_density = copy.deepcopy(model)
    dense, report = dense_and_sparse(model, batches, density=0.1, steps=10)
    assert [layer.name for layer in report.layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for layer in report.layers:
        assert (layer.k, layer.ffn, layer.activation) == (26, 256, "relu*up")
        assert layer.recall > 3 * layer.chance_recall, str(report)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, SparseMLP) and mlp.form == "gathered" and mlp.up_activation == "identity"
    assert torch.equal(mlp.up.weight, dense.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(mlp.fc1.weight, dense.model.layers[0].mlp.gate_proj.weight)
    sparsify(full_density, batches, density=1.0, steps=0, progress=False, form="masked")
    ids = token_batches(96, n=1, batch=1, length=5, seed=6)[0]
    with torch.no_grad():
        assert relative_error(full_density(input_ids=ids).logits, dense(input_ids=ids).logits) < 1e-5
        assert torch.isfinite(model(input_ids=ids).logits).all()


class FeedForward(nn.Module):
    """Meta's Llama FeedForward, ReLU-fied: w2(relu(w1(x)) * w3(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim), nn.Linear(dim, hidden_dim)

    def forward(self, x):
        return self.w2(F.relu(self.w1(x)) * self.w3(x))


class DReLUMLP(nn.Module):
    """TurboSparse's dReLU MLP, up_proj listed first: down_proj(relu(gate_proj(x)) * relu(up_proj(x)))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.relu(self.gate_proj(x)) * F.relu(self.up_proj(x)))


class InlineGated(DReLUMLP):
    """A gated MLP written inline with its residual: no module is the MLP alone."""

    def forward(self, x):
        return x + super().forward(x)


def test_gated_modules_are_found_and_inline_ones_reported():
    torch.manual_seed(0)
    model = nn.Sequential(FeedForward(16, 48), DReLUMLP(16, 48), InlineGated(16, 48)).eval()
    batches = [torch.randn(64, 16) for _ in range(4)]
    dense, report = dense_and_sparse(model, batches, density=0.5, steps=5)
    assert [(layer.name, layer.activation) for layer in report.layers] == [("0", "relu*up"), ("1", "relu*relu")]
    assert isinstance(model[0], SparseMLP) and isinstance(model[1], SparseMLP)
    assert torch.equal(model[0].fc1.weight, dense[0].w1.weight) and torch.equal(model[0].up.weight, dense[0].w3.weight)
    assert [name for name, _ in report.skipped] == ["2.up_proj"]
    assert "a gated MLP inside InlineGated.forward" in report.skipped[0][1]
    assert all(layer.recall > layer.chance_recall for layer in report.layers), str(report)


class ResidualMLP(nn.Module):
    """fc1 -> functional ReLU -> fc2 with a residual: the MLP is not a module of its own."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class SharedActivation(nn.Module):
    """The activation module is also used outside the MLP: folding it into fc1 would change the model."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + self.act(x)


def test_sequential_mlp_installs_and_near_misses_are_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)),
                          ResidualMLP()).eval()
    batches = [torch.randn(64, 16) for _ in range(4)]
    report = sparsify(model, batches, density=0.5, steps=5, progress=False)
    assert [layer.name for layer in report.layers] == ["1"] and isinstance(model[1], SparseMLP)
    assert report.layers[0].activation == "gelu"
    assert report.skipped == [("2.fc1", "its activation is applied functionally inside ResidualMLP.forward, "
                                        "which does more than the MLP")]


def test_failed_install_is_undone():
    torch.manual_seed(0)
    model = nn.Sequential(SharedActivation()).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="left unchanged"):
        sparsify(model, [torch.randn(32, 16) for _ in range(3)], density=0.5, steps=0, progress=False)
    assert isinstance(model[0].act, nn.ReLU) and isinstance(model[0].fc2, nn.Linear)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_arguments_are_checked_and_progress_is_shown(capsys):
    model, _ = example(DejaVuConfig.tiny(form="dense", n_layer=1))
    for bad in ({"density": 0.0}, {"form": "dense"}):
        with pytest.raises(ValueError):
            sparsify(model, token_batches(96, n=1), progress=False, **bad)
    with pytest.raises(ValueError, match="at least one"):
        sparsify(model, [], progress=False)
    sparsify(model, token_batches(96, n=2), steps=1, progress=True)
    assert "sparsify: fitting predictors" in capsys.readouterr().err

"""The language-model scaffolding H3 and Hyena share, around a sequence mixer of their own:

    x      = embedding(ids)                                    (b, L, d_model)
    x      = x + mixer(ln_1(x));  x = x + MLP(ln_2(x))          n_layer pre-norm blocks
    logits = lm_head(ln_f(x))                                  lm_head tied to the embedding

A config provides vocab_size, d_model, n_layer, mlp_ratio and norm_eps; the mixer is built from it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MixerFactory = Callable[[object], nn.Module]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.fc2 = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual: x + mixer(ln1(x)), then x + MLP(ln2(x))."""

    def __init__(self, config, mixer: MixerFactory):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mixer = mixer(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class SequenceLM(nn.Module):
    """Token ids (b, L) -> logits (b, L, vocab_size)."""

    def __init__(self, config, mixer: MixerFactory):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, mixer) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def example(build: Callable[[], SequenceLM], batch: int, length: int, seed: int):
    """(model in eval mode, example token ids) for the CLI and the demo: `build()` after seeding."""
    torch.manual_seed(seed)
    model = build().eval()
    return model, (torch.randint(0, model.config.vocab_size, (batch, length)),)

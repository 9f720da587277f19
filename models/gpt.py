"""A GPT written the way papers and nanoGPT write it, for compiling and testing attention.

    x = tok_emb(ids) + pos_emb(t)
    for each block:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
    attn: q, k, v = split(W_qkv x); heads; softmax(q k^T / sqrt(d) + causal) v; W_o
    logits = lm_head(ln_f(x))

`attention="naive"` spells attention out (matmul, scale, masked_fill with a registered
tril buffer, softmax in fp32, dropout); `attention="sdpa"` calls
F.scaled_dot_product_attention(is_causal=True). `n_kv_head < n_head` gives GQA (MQA at 1),
with K/V heads repeated by `repeat_kv` in the naive form and `enable_gqa` in the SDPA form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    attention: str = "naive"  # "naive" | "sdpa"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def tiny(cls, **overrides) -> GPTConfig:
        return replace(cls(vocab_size=96, block_size=128, n_layer=2, n_head=4, n_kv_head=4, n_embd=64), **overrides)

    @classmethod
    def gpt2_small(cls, **overrides) -> GPTConfig:
        return replace(cls(), **overrides)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, kv_heads, l, d) -> (b, kv_heads * n_rep, l, d), each kv head repeated n_rep times."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.config = config
        kv_dim = config.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        causal = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", causal.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        kv_dim = c.n_kv_head * c.head_dim
        q, k, v = self.c_attn(x).split([c.n_embd, kv_dim, kv_dim], dim=2)
        q = q.view(b, t, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = v.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        if c.attention == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=c.dropout if self.training else 0.0,
                enable_gqa=c.n_kv_head != c.n_head)
        else:
            y = self._naive(q, k, v, t)
        y = y.transpose(1, 2).contiguous().view(b, t, c.n_embd)
        return self.resid_dropout(self.c_proj(y))

    def _naive(self, q, k, v, t):
        n_rep = self.config.n_head // self.config.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        att = self.attn_dropout(att)
        return att @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        positions = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def example(config: GPTConfig, batch: int = 2, length: int = 64, seed: int = 0):
    """(model in eval mode, example args) for the CLI and the demo."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    return model, (torch.randint(0, config.vocab_size, (batch, length)),)


def tiny_naive(batch: int = 2, length: int = 64, seed: int = 0):
    return example(GPTConfig.tiny(), batch, length, seed)


def tiny_sdpa_gqa(batch: int = 2, length: int = 64):
    return example(GPTConfig.tiny(attention="sdpa", n_kv_head=2), batch, length)


def tiny_naive_mqa(batch: int = 2, length: int = 64):
    return example(GPTConfig.tiny(n_kv_head=1), batch, length)


def gpt2_small(attention: str = "sdpa", batch: int = 8, length: int = 1024):
    return example(GPTConfig.gpt2_small(attention=attention), batch=batch, length=length)

"""DejaVu (Liu et al., 2023): an OPT-style decoder whose MLPs are contextually sparse.

    x = tok_emb(ids) + pos_emb(t)
    for each block (pre-LN, as OPT-1.3B..175B):
        idx = topk(predictor(x), k)            DejaVu's lookahead: the block input picks the neurons
        h = x + attn(ln_1(x))                  multi-head attention through SDPA
        x = h + mlp(ln_2(h), idx)              fc1 -> ReLU/GELU -> fc2 on the k selected neurons only
    logits = lm_head(ln_f(x))

The predictor is DejaVu's low-rank MLP, scores = B (A x) + c with A (r, d) and B (F, r): one logit
per ffn neuron. All rows of a call (a decode batch) share one set of k neurons, those with the
largest summed probability, as DejaVu does per token batch. The sparse MLP is written in the two
forms papers use (`form` picks one; "dense" runs the plain MLP, the model before sparsity):

    gathered:  act(x W1[idx]^T + b1[idx]) W2[:, idx]^T + b2       reads only the selected weights
    masked:    fc2(act(fc1(x)) * mask), mask 1 at idx, else 0      computes all F, keeps k

With unique indices both forms are the same function (tests check it in fp64). SparseMLP also
holds gated MLPs (compiler.sparsify installs it in Llama-style models): with an up projection
W3, h = act(x W1^T + b1) * up_act(x W3^T + b3) in place of act(x W1^T + b1), W1 the gate.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}
UP_ACTIVATIONS = {"identity": lambda v: v, **ACTIVATIONS}  # a gated MLP's activation of its up projection
FORMS = ("dense", "gathered", "masked")


@dataclass(frozen=True)
class DejaVuConfig:
    vocab_size: int = 50272
    max_positions: int = 2048
    n_layer: int = 24
    n_head: int = 32
    d_model: int = 2048
    ffn: int = 8192
    predictor_rank: int = 128  # d / 16: the predictor reads ~4% of the MLP's weight bytes
    density: float = 0.1  # fraction of the ffn neurons kept per call
    activation: str = "relu"
    form: str = "gathered"
    bias: bool = True

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")

    @property
    def k(self) -> int:
        """Neurons kept per call: density * ffn, at least one."""
        return max(1, round(self.density * self.ffn))

    @classmethod
    def tiny(cls, **overrides) -> DejaVuConfig:
        return replace(cls(vocab_size=96, max_positions=128, n_layer=2, n_head=4, d_model=64, ffn=256,
                           predictor_rank=16), **overrides)

    @classmethod
    def opt_1_3b(cls, **overrides) -> DejaVuConfig:
        return replace(cls(), **overrides)

    @classmethod
    def opt_6_7b(cls, **overrides) -> DejaVuConfig:
        return replace(cls(n_layer=32, d_model=4096, ffn=16384, predictor_rank=256), **overrides)


class MLPPredictor(nn.Module):
    """DejaVu's low-rank neuron scorer: logits (..., F) = up(down(x)), rank r << d."""

    def __init__(self, d_model: int, ffn: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def select_neurons(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) sorted indices of the neurons with the largest probability summed over all rows of scores."""
    total = scores.reshape(-1, scores.shape[-1]).float().sigmoid().sum(0)
    return total.topk(k, sorted=False).indices.sort().values


def neuron_mask(idx: torch.Tensor, ffn: int, dtype: torch.dtype) -> torch.Tensor:
    """(F,) mask: 1 at the selected neurons, 0 elsewhere."""
    return torch.zeros(ffn, dtype=dtype, device=idx.device).scatter(0, idx, 1.0)


def hidden_activations(x, w1, b1, act, up=None, idx=None):
    """h = act(x W1^T + b1), gated (up = (W3, b3, up_act)) times up_act(x W3^T + b3); over the
    neurons idx alone (gathered rows of W1, W3, b1, b3) unless idx is None."""
    h = act(_projection(x, w1, b1, idx))
    if up is not None:
        w3, b3, up_act = up
        h = h * up_act(_projection(x, w3, b3, idx))
    return h


def _projection(x, w, b, idx):
    if idx is None:
        return F.linear(x, w, b)
    return F.linear(x, w[idx], None if b is None else b[idx])


def gathered_mlp(x, w1, b1, w2, b2, idx, act, up=None):
    """DejaVu's sparse MLP: act(x W1[idx]^T + b1[idx]) W2[:, idx]^T + b2, reading only the k selected
    neurons; gated (up = (W3, b3, up_act)), h = act(...) * up_act(x W3[idx]^T + b3[idx])."""
    return F.linear(hidden_activations(x, w1, b1, act, up, idx), w2[:, idx], b2)


def masked_mlp(x, w1, b1, w2, b2, mask, act, up=None):
    """The same MLP computed densely, unselected neurons zeroed: fc2(act(fc1(x)) * mask)
    (gated: down(act(gate(x)) * up_act(up(x)) * mask))."""
    return F.linear(hidden_activations(x, w1, b1, act, up) * mask, w2, b2)


class SparseMLP(nn.Module):
    """fc1 -> act -> fc2 with a DejaVu predictor; `form` is "dense", "gathered" or "masked".
    Gated when `up` is given: down(act(gate(x)) * up_act(up(x))) with fc1 the gate and fc2 down.

    forward(x, predictor_input=None): the predictor reads predictor_input (the block input in
    DejaVuBlock) or, when None, x itself. `k` and `form` are plain attributes and may be changed.
    """

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, predictor: MLPPredictor, *, k: int,
                 activation: str = "relu", form: str = "gathered", up: nn.Linear | None = None,
                 up_activation: str = "identity"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        self.fc1, self.fc2, self.predictor, self.up = fc1, fc2, predictor, up
        self.k, self.activation, self.form, self.up_activation = k, activation, form, up_activation

    @property
    def ffn(self) -> int:
        return self.fc1.out_features

    def extra_repr(self) -> str:
        gating = "" if self.up is None else f", gated, up_activation={self.up_activation}"
        return f"k={self.k}, ffn={self.ffn}, activation={self.activation}{gating}, form={self.form}"

    def forward(self, x: torch.Tensor, predictor_input: torch.Tensor | None = None) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        up = None if self.up is None else (self.up.weight, self.up.bias, UP_ACTIVATIONS[self.up_activation])
        if self.form == "dense":
            return F.linear(hidden_activations(x, w1, b1, act, up), w2, b2)
        idx = select_neurons(self.predictor(x if predictor_input is None else predictor_input), self.k)
        if self.form == "gathered":
            return gathered_mlp(x, w1, b1, w2, b2, idx, act, up)
        return masked_mlp(x, w1, b1, w2, b2, neuron_mask(idx, self.ffn, x.dtype), act, up)


class SelfAttention(nn.Module):
    """OPT's multi-head causal self-attention (separate q/k/v projections) through SDPA."""

    def __init__(self, config: DejaVuConfig):
        super().__init__()
        d, bias = config.d_model, config.bias
        self.n_head = config.n_head
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class DejaVuBlock(nn.Module):
    """Pre-LN OPT decoder layer whose MLP neurons are picked from the block input."""

    def __init__(self, config: DejaVuConfig):
        super().__init__()
        d, ffn = config.d_model, config.ffn
        self.ln_1 = nn.LayerNorm(d)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = SparseMLP(
            nn.Linear(d, ffn, bias=config.bias), nn.Linear(ffn, d, bias=config.bias),
            MLPPredictor(d, ffn, config.predictor_rank),
            k=config.k, activation=config.activation, form=config.form,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x))
        return h + self.mlp(self.ln_2(h), predictor_input=x)


class DejaVuLM(nn.Module):
    """Token and position embeddings, DejaVu blocks, final LayerNorm, tied LM head."""

    def __init__(self, config: DejaVuConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_positions, config.d_model)
        self.blocks = nn.ModuleList(DejaVuBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.config.max_positions:
            raise ValueError(f"sequence length {t} exceeds max_positions {self.config.max_positions}")
        x = self.embed_tokens(ids) + self.embed_positions(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def example(config: DejaVuConfig, batch: int = 2, length: int = 16, seed: int = 0):
    """(model in eval mode, example args) for the CLI, the demo and tests."""
    torch.manual_seed(seed)
    model = DejaVuLM(config).eval()
    return model, (torch.randint(0, config.vocab_size, (batch, length)),)


def tiny_gathered():
    return example(DejaVuConfig.tiny(form="gathered"))


def tiny_masked():
    return example(DejaVuConfig.tiny(form="masked"))

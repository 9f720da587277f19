"""Mamba (Gu & Dao, 2023): a language model built from selective state-space blocks.

Each block mixes along the sequence with a diagonal linear recurrence whose parameters depend
on the input ("selective"), per channel c and state index i:

    Δ_t        = softplus(dt_proj(x_proj(x_t)) + bias)            step size, (b, d, L)
    Ā_t        = exp(Δ_t A)                                       zero-order-hold discretisation
    B̄_t u_t    = Δ_t B_t u_t                                      (Euler rule for B, as in the paper)
    h_t        = Ā_t ⊙ h_{t-1} + B̄_t u_t                          state, (b, d, n)
    y_t        = C_t · h_t + D u_t                                readout and skip
    out_t      = y_t ⊙ silu(z_t)                                  gate

The recurrence is written the way reference code writes it: a Python loop over L
(`selective_scan_ref`, the semantics of mamba_ssm's function of the same name), which a tracer
unrolls into L copies of the step; flashfx's ssm_scan pass rolls it back into one scan kernel.
`selective_state_update_ref` is the same recurrence for one decoding step with a carried state.

A block, with d = expand * d_model channels:

    x, z  = in_proj(hidden).chunk(2)                              (b, d, L) each
    x     = silu(causal depthwise conv1d(x))                      kernel d_conv, left padding d_conv - 1
    Δ, B, C = split(x_proj(x))                                    ranks dt_rank, n, n
    y     = selective_scan(x, dt_proj.weight Δ, A = -exp(A_log), B, C, D, z,
                           delta_bias = dt_proj.bias, softplus)
    out   = out_proj(y)

The language model: embedding -> n_layer pre-norm residual blocks (RMSNorm or LayerNorm) ->
final norm -> lm head tied to the embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions (as mamba_ssm does), float64 stays float64 for references."""
    return torch.promote_types(dtype, torch.float32)


def _per_channel(BC: torch.Tensor, dim: int, grouped_rank: int) -> torch.Tensor:
    """Repeat a grouped B or C (group axis 1) so that channel c reads group c // (dim // groups)."""
    if BC.dim() < grouped_rank:
        return BC
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


def _readout(h: torch.Tensor, C: torch.Tensor, t: int) -> torch.Tensor:
    """y_t = C_t · h_t over the state axis; C is (b, n, L) or per channel (b, d, n, L)."""
    if C.dim() == 3:
        return torch.einsum("bdn,bn->bd", h, C[:, :, t])
    return torch.einsum("bdn,bdn->bd", h, C[:, :, :, t])


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t · h_t + D u_t, as a loop over L.

    u, delta, z (b, d, L); A (d, n); B, C (b, n, L) or grouped (b, g, n, L); D, delta_bias (d,).

    Computes in float32 (float64 for float64 inputs) and returns out in u's dtype, plus the
    final state in the compute dtype when return_last_state.
    """
    dtype_in = u.dtype
    compute = _compute_dtype(dtype_in)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape
    B, C = _per_channel(B, dim, 4), _per_channel(C, dim, 4)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append(_readout(h, C, t))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the selective scan: h = exp(Δ A) h + Δ B x written into state, returns C · h + D x.

    state (b, d, n); x, dt, z (b, d); A (d, n); B, C (b, n) or grouped (b, g, n); D, dt_bias (d,).

    Computes in float32 (float64 for float64 inputs); the readout uses h before it is rounded
    to state's dtype.
    """
    dtype_in = x.dtype
    compute = _compute_dtype(dtype_in)
    x, dt, A, B, C = (t.to(compute) for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)
    dim = x.shape[1]
    B, C = _per_channel(B, dim, 3), _per_channel(C, dim, 3)
    if B.dim() == 2:
        B, C = B[:, None, :], C[:, None, :]
    h = torch.exp(dt[:, :, None] * A) * state.to(compute) + (dt * x)[:, :, None] * B
    state.copy_(h)
    out = (h * C).sum(dim=-1)
    if D is not None:
        out = out + x * D.to(compute)
    if z is not None:
        out = out * F.silu(z.to(compute))
    return out.to(dtype_in)


@dataclass
class MambaConfig:
    """Sizes of a Mamba language model; dt_rank None means ceil(d_model / 16)."""

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    rms_norm: bool = True
    norm_eps: float = 1e-5
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @classmethod
    def tiny(cls) -> MambaConfig:
        """For CPU tests: 64 channels, 4 states, 2 layers."""
        return cls(d_model=32, n_layer=2, vocab_size=64, d_state=4)

    @classmethod
    def mamba_130m(cls) -> MambaConfig:
        """The shapes of state-spaces/mamba-130m (vocabulary padded to a multiple of 8)."""
        return cls(d_model=768, n_layer=24, vocab_size=50280)

    @classmethod
    def mamba_370m(cls) -> MambaConfig:
        """The shapes of state-spaces/mamba-370m."""
        return cls(d_model=1024, n_layer=48, vocab_size=50280)


class MambaBlock(nn.Module):
    """The selective SSM mixer: (b, L, d_model) -> (b, L, d_model)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        d_inner, d_state = config.d_inner, config.d_state
        self.dt_rank, self.d_state = config.dt_rank, d_state
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(d_inner, config.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(config.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias)
        self._init_dt_proj(config)

    @torch.no_grad()
    def _init_dt_proj(self, config: MambaConfig) -> None:
        """S6 initialisation: softplus(dt_proj.bias) log-uniform in [dt_min, dt_max]."""
        std = config.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand(config.d_inner) * (math.log(config.dt_max) - math.log(config.dt_min))
        dt = torch.exp(log_dt + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        seqlen = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :seqlen])
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        y = selective_scan_ref(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                               delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))


class ResidualBlock(nn.Module):
    """Pre-norm residual: hidden + mixer(norm(hidden))."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.norm = _norm(config)
        self.mixer = MambaBlock(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mixer(self.norm(hidden))


def _norm(config: MambaConfig) -> nn.Module:
    if config.rms_norm:
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class MambaLM(nn.Module):
    """Token ids (b, L) -> logits (b, L, vocab_size)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(ResidualBlock(config) for _ in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.lm_head(self.norm_f(hidden))


def example(config: MambaConfig, batch: int = 2, length: int = 32, seed: int = 0):
    """(model in eval mode, example token ids) for the CLI and the demo."""
    torch.manual_seed(seed)
    model = MambaLM(config).eval()
    return model, (torch.randint(0, config.vocab_size, (batch, length)),)


def tiny():
    return example(MambaConfig.tiny())

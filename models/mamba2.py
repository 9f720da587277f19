"""Mamba-2 (Dao & Gu, "Transformers are SSMs", 2024): the state-space dual (SSD) layer.

Per head h with a scalar decay A_h < 0, head dim p, state n, and groups of heads sharing B and C:

    Δ_t  = softplus(dt_t + dt_bias)                   (b, L, h)
    S_t  = exp(Δ_t A) S_{t-1} + Δ_t x_t ⊗ B_t          (b, h, p, n), S_{-1} = 0 (or a carried state)
    y_t  = S_t C_t + D x_t                            (b, L, h, p)

The same map is a masked matrix product ("attention" with a decay mask): with a_t = Δ_t A and
segsum(a)[t, s] = a_{s+1} + ... + a_t (-inf for s > t),

    y = ((C B^T) ∘ exp(segsum(a))) (Δ x)  + D x

The chunked algorithm (SSD) splits the sequence into chunks: within a chunk that product, across
chunks a short recurrence on the chunk-boundary states. Written here the ways code writes it:

    ssd_minimal_discrete         mamba_ssm's minimal reference: segsum, 4- and 3-operand einsums,
                                 the rearranges as reshape/permute (torch only)
    ssd_minimal_discrete_einops  the same as mamba_ssm writes it, with einops (when installed)
    ssd_recurrence               a plain loop over time
    ssd_step                     one decoding step; the state updated in place (state.copy_), as
                                 mamba_ssm's Mamba2.step does without its kernels

Mamba2Mixer is a Mamba-2 block around one of the scans: in_proj -> (z, xBC, dt); depthwise causal
conv1d + SiLU over xBC; SSD; D skip; y * silu(z); group RMSNorm; out_proj.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    import einops
except ImportError:  # the einops spelling is then unavailable; everything else works
    einops = None


def segsum(x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's stable segment sum: S[..., i, j] = x[..., j+1] + ... + x[..., i], -inf for j > i."""
    T = x.size(-1)
    return _masked_running_sums(x[..., None].expand(*x.shape, T))


def _masked_running_sums(x: torch.Tensor) -> torch.Tensor:
    """segsum's body, from x[..., i] broadcast along a new last dim (no differences of sums)."""
    T = x.size(-1)
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """mamba_ssm's ssd_minimal_discrete with torch reshapes for einops' rearranges.

    X (b, L, h, p) = x * Δ;  A (b, L, h) = Δ * A_h;  B, C (b, L, h, n); L a multiple of block_len;
    initial_states (b, 1, h, p, n). Returns Y (b, L, h, p) and the final state (b, h, p, n).
    """
    X, A, B, C = [x.reshape(x.shape[0], x.shape[1] // block_len, block_len, *x.shape[2:]) for x in (X, A, B, C)]
    A = A.permute(0, 3, 1, 2)
    A_cumsum = torch.cumsum(A, dim=-1)

    # 1. intra-chunk (diagonal blocks)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)

    # 2. the state at the end of each chunk, from that chunk alone
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)

    # 3. the recurrence across chunk boundaries
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. each chunk's output from the state at its start (off-diagonal blocks)
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)

    Y = Y_diag + Y_off
    return Y.reshape(Y.shape[0], -1, *Y.shape[3:]), final_state


def _segsum_einops(x: torch.Tensor) -> torch.Tensor:
    return _masked_running_sums(einops.repeat(x, "... d -> ... d e", e=x.size(-1)))


def ssd_minimal_discrete_einops(X, A, B, C, block_len, initial_states=None):
    """ssd_minimal_discrete exactly as mamba_ssm writes it (einops rearrange and repeat)."""
    X, A, B, C = [einops.rearrange(x, "b (c l) ... -> b c l ...", l=block_len) for x in (X, A, B, C)]
    A = einops.rearrange(A, "b c l h -> b h c l")
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(_segsum_einops(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp((A_cumsum[:, :, :, -1:] - A_cumsum))
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(_segsum_einops(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    Y = einops.rearrange(Y_diag + Y_off, "b c l h p -> b (c l) h p")
    return Y, final_state


def ssd_recurrence(X, A, B, C, block_len=None, initial_states=None):
    """The same map as a loop over time: S_t = exp(A_t) S_{t-1} + X_t ⊗ B_t, Y_t = S_t C_t.

    Arguments as ssd_minimal_discrete (block_len is ignored)."""
    batch, seqlen, heads, headdim = X.shape
    state = X.new_zeros(batch, heads, headdim, B.shape[-1]) if initial_states is None else initial_states[:, 0]
    ys = []
    for t in range(seqlen):
        decay = torch.exp(A[:, t])[:, :, None, None]
        state = decay * state + X[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1), state


def ssd_step(state, x, dt, A, B, C, D, dt_bias):
    """One decoding step with the state updated in place (mamba_ssm's Mamba2.step, PyTorch path).

    state (b, h, p, n); x (b, h, p); dt (b, h) before bias and softplus; A, D, dt_bias (h,);
    B, C (b, g, n). Returns y (b, h, p) in x's dtype."""
    heads = x.shape[1]
    dt = F.softplus(dt + dt_bias.to(dtype=dt.dtype))
    dA = torch.exp(dt * A)
    B, C = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (B, C))
    dBx = torch.einsum("bh,bhn,bhp->bhpn", dt, B, x)
    state.copy_(state * dA[:, :, None, None] + dBx)
    y = torch.einsum("bhpn,bhn->bhp", state.to(x.dtype), C)
    return y + D.to(x.dtype)[:, None] * x


class Mamba2Step(nn.Module):
    """mamba_ssm's Mamba2.step: the state is a buffer updated in place by ssd_step."""

    def __init__(self, heads=4, headdim=8, dstate=8, groups=2, batch=2):
        super().__init__()
        self.register_buffer("state", torch.randn(batch, heads, headdim, dstate))
        self.A_log = nn.Parameter(torch.rand(heads))
        self.D, self.dt_bias = nn.Parameter(torch.randn(heads)), nn.Parameter(torch.rand(heads) - 4)
        self.groups = groups

    def forward(self, x, dt, B, C):
        return ssd_step(self.state, x, dt, -torch.exp(self.A_log), B, C, self.D, self.dt_bias)


def step_tiny() -> tuple[Mamba2Step, list[torch.Tensor]]:
    """(a decode step of 4 heads of 8 channels, state size 8, 2 groups, batch 2; its inputs)."""
    torch.manual_seed(0)
    return Mamba2Step(), [torch.randn(2, 4, 8), torch.randn(2, 4), torch.randn(2, 2, 8), torch.randn(2, 2, 8)]


SCANS = {"chunked": ssd_minimal_discrete, "einops": ssd_minimal_discrete_einops, "recurrent": ssd_recurrence}


@dataclass
class Mamba2Config:
    """Sizes of a Mamba-2 block (mamba_ssm's names)."""

    d_model: int
    d_state: int = 128
    headdim: int = 64
    ngroups: int = 1
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 256
    norm_eps: float = 1e-5

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @classmethod
    def tiny(cls) -> Mamba2Config:
        """For CPU tests: 4 heads of 8 channels, 8 states, 2 groups, chunks of 8."""
        return cls(d_model=16, d_state=8, headdim=8, ngroups=2, chunk_size=8)

    @classmethod
    def mamba2_130m(cls) -> Mamba2Config:
        """The block shapes of state-spaces/mamba2-130m: 24 heads of 64, 128 states, one group."""
        return cls(d_model=768)

    @classmethod
    def mamba2_780m(cls) -> Mamba2Config:
        """The block shapes of state-spaces/mamba2-780m: 48 heads of 64, 128 states, one group."""
        return cls(d_model=1536)


class Mamba2Mixer(nn.Module):
    """A Mamba-2 block, (b, L, d_model) -> (b, L, d_model), its scan one of SCANS. The chunked scans
    need L to be a multiple of chunk_size, as mamba_ssm's minimal reference does."""

    def __init__(self, config: Mamba2Config, scan: str = "chunked"):
        super().__init__()
        self.config, self.scan = config, SCANS[scan]
        d_inner, groups_state = config.d_inner, config.ngroups * config.d_state
        conv_dim = d_inner + 2 * groups_state
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner + 2 * groups_state + config.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.d_conv, groups=conv_dim, padding=config.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.rand(config.nheads) - 4.0)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, config.nheads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.randn(config.nheads))
        self.norm = nn.RMSNorm(d_inner // config.ngroups, eps=config.norm_eps)
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        config = self.config
        batch, seqlen, _ = u.shape
        groups_state = config.ngroups * config.d_state
        z, xBC, dt = self.in_proj(u).split([config.d_inner, config.d_inner + 2 * groups_state, config.nheads], -1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :seqlen]).transpose(1, 2)
        x, B, C = xBC.split([config.d_inner, groups_state, groups_state], dim=-1)
        x = x.reshape(batch, seqlen, config.nheads, config.headdim)
        B, C = (t.reshape(batch, seqlen, config.ngroups, config.d_state)
                .repeat_interleave(config.nheads // config.ngroups, dim=2) for t in (B, C))
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        y, _ = self.scan(x * dt[..., None], (A * dt).to(x.dtype), B, C, config.chunk_size)
        y = y + x * self.D[:, None]
        y = (y.reshape(batch, seqlen, config.d_inner) * F.silu(z)).reshape(batch, seqlen, config.ngroups, -1)
        return self.out_proj(self.norm(y).reshape(batch, seqlen, config.d_inner))


def example(config: Mamba2Config, scan: str = "chunked", batch: int = 2, length: int = 32, seed: int = 0):
    """(a Mamba-2 block in eval mode, example inputs) for the CLI and the demo."""
    torch.manual_seed(seed)
    return Mamba2Mixer(config, scan).eval(), (torch.randn(batch, length, config.d_model),)


def tiny():
    return example(Mamba2Config.tiny())

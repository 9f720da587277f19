"""What the passes hand the lowering: a FusedSpec per match, and the frozen data it holds.

A pass proves that a subgraph computes one family's function and records how, as data only:

    spec = FusedSpec("attention", {"scale": s, "layout": AttentionLayout(...), "static_form": MaskForm(...)},
                     example=(q, k, v))
    context.fuse(graph, anchor, spec, inputs, replaced, detail)      # a fused node holding the spec

compiler.lower then builds each fused node's runtime op from its spec, through the family registry
(runtime.families.FAMILIES[spec.op].op(replaced, mode=..., **spec.params)), renders and loads its
kernels (prepare(*spec.example)) and lowers the graph to fx. Passes import this module, never the
runtime or codegen; the runtime ops read the same classes.

    attention      MaskForm (how a kernel variant masks the scores), AttentionLayout, MultiheadLayout,
                   EncoderLayout (where q, k, v and the masks come from in the graph)
    convolutions   OutputLayout (the eager output's dtype and dim order), LongConvLayout
    sparse MLP     SparseMLPLayout (form, biases, transposed or merged weights, the mask's selection)
    scans          Operand, Result (dims labelled with roles), SSMLayout, SSDLayout, and the dims
                   of the kernels' arguments the runtime views the operands in (SSM_SCAN_DIMS, SSD_*_DIMS)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

Labels = tuple  # per dim: its role(s), a string; a unit dim is None (ssm_scan) or "" (ssd_scan)


@dataclass(frozen=True, eq=False)
class FusedSpec:
    """One match, as data.

    family    the pattern report() names: "attention", "long_conv", "ssm_scan", ...
    params    the runtime op's arguments (read-only): layouts and forms below, numbers, a folded constant
    example   what the op's prepare() reads to pick its kernels: example operands (fake or meta tensors)
              or sizes; empty when the params say it all
    op        the op's row in runtime.families.FAMILIES ("multihead_attention", "ssm_state_update"...);
              the family's name by default
    """

    family: str
    params: Mapping[str, Any]
    example: tuple = ()
    op: str = ""

    def __post_init__(self):
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "op", self.op or self.family)


# -- attention -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskForm:
    """How one kernel variant masks the scores."""

    kind: str = "none"  # "none" | "bool" | "additive"
    keep_when: bool = True  # bool masks: keep scores where mask == keep_when
    fill_value: float = -math.inf  # bool masks: value replacing dropped scores
    multiplier: float = 1.0  # additive masks: scales applied after the mask
    causal: str | None = None  # None | "top_left" (SDPA) | "bottom_right" (flash-attn)
    empty_rows_zero: bool = False  # rows with no visible key give 0 (SDPA) instead of NaN (softmax)
    chain: tuple = ()  # several masks applied in turn (each a MaskForm), combined into one additive one

    def describe(self) -> str:
        parts = [f"causal ({self.causal})"] if self.causal else []
        if self.chain:
            parts.append(f"{' then '.join(form.kind for form in self.chain)} masks as one bias")
        elif self.kind != "none":
            parts.append(f"{self.kind} mask")
        return ", ".join(parts) or "no mask"


@dataclass(frozen=True)
class AttentionLayout:
    """Where q/k/v come from in the graph: key given transposed; scores regrouped between batch
    layouts ((b*h, ...) <-> (b, h, ...)) on the way, and the batch dims of the scores each mask was
    written for when they differ from v's (the output's)."""

    key_transposed: bool = False
    out_dtype: torch.dtype = torch.float32
    regroup_qk: bool = False
    mask_batches: tuple = ()  # per mask: None, or the batch dims it was written for


@dataclass(frozen=True)
class MultiheadLayout:
    """Which of F.multi_head_attention_forward's tensors the graph passes (`roles`, in order), its head
    count, and whether its attention weights path (need_weights: softmax rows of -inf give NaN) or
    its SDPA path (they give 0) is the one to match."""

    roles: tuple[str, ...]
    num_heads: int
    need_weights: bool


@dataclass(frozen=True)
class EncoderLayout:
    """torch._transformer_encoder_layer_fwd's tensors as the graph passes them (`roles`) and its flags;
    mask_type 1 is a key padding mask (batch, src_len), 2 a merged (batch, heads, len, len) mask."""

    roles: tuple[str, ...]
    num_heads: int
    use_gelu: bool
    norm_first: bool
    eps: float
    mask_type: int | None


# -- long and short convolutions --------------------------------------------------------------------
@dataclass(frozen=True)
class OutputLayout:
    """The eager output's dtype and dim order (outermost first) for a dense allocation."""

    dtype: torch.dtype
    order: tuple[int, ...]

    @classmethod
    def like(cls, value: torch.Tensor) -> OutputLayout:
        """The layout of `value` (a fake tensor from capture): dims sorted by decreasing stride."""
        order = sorted(range(value.dim()), key=lambda dim: -value.stride(dim))
        return cls(value.dtype, tuple(order))

    def empty(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        inverse = sorted(range(len(self.order)), key=self.order.__getitem__)
        dense = torch.empty([shape[dim] for dim in self.order], dtype=self.dtype, device=device)
        return dense.permute(inverse)


@dataclass(frozen=True)
class LongConvLayout:
    """How graph tensors map onto kernel rows: u's leading `batch_dims` dims are batch, the rest
    before L channels; which optional operands the graph passes; the output's layout."""

    batch_dims: int
    has_D: bool
    has_pre_gate: bool
    has_post_gate: bool
    out: OutputLayout  # of the output with time moved last
    time: int = -1  # the graph tensors' time dim, counted from the end
    signal_dims: tuple[int, ...] | None = None  # u's dims before time, as the output's broadcast reads them
    filter_dims: tuple[int, ...] | None = None  # k's dims before time, likewise (None: its own)
    period: int | None = None  # k is the filter of a circular convolution of this period


# -- sparse MLP ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseMLPLayout:
    """Which operands the graph passes, and how: form, optional biases, weights stored transposed."""

    form: str  # "gathered" (idx) | "masked" (mask)
    has_b1: bool
    has_b2: bool
    w1_transposed: bool = False  # the graph holds W1^T (D, F)
    w2_transposed: bool = False  # the graph holds W2^T (F, D)
    indices_proven: bool = True  # gathered idx provably in [0, F) (top-k/sort indices); else checked per call
    mask_keeps: bool | None = None  # masked by selection: a bool mask keeps where it equals this; None: a product
    gated: bool = False  # operands W3 (and b3) follow b1: the up projection
    has_b3: bool = False
    w3_transposed: bool = False
    w1_rows: tuple[int, int] | None = None  # W1 (b1) is these rows of the operand: a merged gate_up_proj
    w3_rows: tuple[int, int] | None = None
    selects: str = "h"  # masked: what the mask selects from, h or (gated) its "gate" or "up" factor
    zero_is_product: bool = False  # selected by where(mask, h, 0 * h): a dropped inf or NaN is NaN

    @property
    def drops_by_product(self) -> bool:
        """Is a dropped neuron's value a product with 0 in eager (NaN where a factor is not finite)?"""
        return self.mask_keeps is None or self.zero_is_product or self.selects != "h"

    def describe(self) -> str:
        names = ("b1", "b3", "b2") if self.gated else ("b1", "b2")
        present = (self.has_b1, self.has_b3, self.has_b2) if self.gated else (self.has_b1, self.has_b2)
        biases = [name for name, there in zip(names, present) if there]
        form = ("gated " if self.gated else "") + self.form
        if self.mask_keeps is not None:
            form += f" (selected where mask is {self.mask_keeps})"
        if self.selects != "h":
            form += f" (on the {self.selects} factor)"
        if self.w1_rows is not None:
            form += " (gate and up split from one projection)"
        return f"{form}, bias {'+'.join(biases) or 'none'}"


# -- selective scan (Mamba) and SSD (Mamba-2) --------------------------------------------------------
@dataclass(frozen=True)
class Operand:
    """A fused-op input: the kernel argument it feeds and the role(s) each of its dims holds."""

    name: str
    labels: Labels


@dataclass(frozen=True)
class Result:
    """An output the op allocates: eager's shape and dtype, and the role(s) each of its dims holds."""

    labels: Labels
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class SSMLayout:
    """Everything the pass proved about one fused scan or decode step."""

    operands: tuple[Operand, ...]
    sizes: tuple[tuple[str, int], ...]  # role -> size, e.g. (("b", 2), ("d", 64), ...)
    out: Result
    state: Result | None  # the final state, when the graph reads it
    softplus: bool = False

    def has(self, name: str) -> bool:
        return any(operand.name == name for operand in self.operands)

    @property
    def grouped(self) -> bool:
        return any("g" in operand.labels for operand in self.operands)


@dataclass(frozen=True)
class SSDLayout:
    """Everything the pass proved about one fused SSD scan or decode step."""

    operands: tuple[Operand, ...]
    sizes: tuple[tuple[str, int], ...]  # role -> size: b, l, h, p, n, g
    out: Result
    state: Result | None  # the final state (scan, when the graph reads it) or the new state (decode)
    dt_softplus: bool = False
    dt_limit: tuple[float, float] | None = None

    def has(self, name: str) -> bool:
        return any(operand.name == name for operand in self.operands)

    def describe(self) -> str:
        sizes = dict(self.sizes)
        parts = [f"b={sizes['b']} h={sizes['h']} p={sizes['p']} n={sizes['n']}"]
        parts += [f"{sizes['g']} groups of B, C"] if sizes["g"] not in (1, sizes["h"]) else []
        parts += ["softplus"] if self.dt_softplus else []
        parts += [f"dt limits {self.dt_limit}"] if self.dt_limit is not None else []
        parts += [name for name in ("dt_bias", "D", "z", "initial_state") if self.has(name)]
        return ", ".join(parts)


# The dims the kernels take each argument in (role letters); the runtime ops view the graph's tensors so.
SSM_SCAN_DIMS = {"u": "bdl", "delta": "bdl", "A": "dn", "B": "bnl", "C": "bnl", "D": "d", "z": "bdl", "delta_bias": "d",
                 "out": "bdl"}
SSD_SCAN_DIMS = {"x": "blhp", "dt": "blh", "A": "blh", "B": "blgn", "C": "blgn", "D": "hp", "z": "blhp", "dt_bias": "h",
                 "initial_state": "bhpn", "out": "blhp"}
SSD_STATE_UPDATE_DIMS = {"state": "bhpn", "x": "bhp", "dt": "bh", "A": "bh", "B": "bgn", "C": "bgn", "D": "hp",
                         "z": "bhp", "dt_bias": "h", "out": "bhp"}

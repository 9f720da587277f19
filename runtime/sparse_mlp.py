"""Run time of the fused contextual-sparsity MLP (DejaVu): launch the gather kernels or fall back.

The sparse-MLP pass hands over the MLP's operands as the graph holds them

    gathered:  y = act(x W1[idx]^T + b1[idx]) W2[:, idx]^T + b2      idx (K,) from the graph
    masked:    y = (act(x W1^T + b1) * mask) W2^T + b2               mask (..., F) bool or float
               or where(mask == keeps, act(x W1^T + b1), 0) W2^T + b2  (where / masked_fill with 0)

and the op computes exactly that, in x's dtype, for x of any rank (leading dims are rows):

    rows = x.reshape(M, D)
    idx  = gathered: idx
           masked:   the neurons the mask keeps, when the mask is 0/1 and every row keeps the
                     same ones (then the masked form equals the gathered one); otherwise the
                     masked MLP runs in PyTorch, as written
    out  = codegen.sparse_mlp launch(rows, W1, b1, column-major W2, b2, idx)   or its reference

Weights arrive as graph inputs on every call. The down kernel reads the selected columns of W2,
contiguous only in a column-major copy; the op keeps one, rebuilt when W2 changes (another
tensor, storage or in-place version). The kernels do not range-check gathered indices: the
pass proves them in [0, F) when they come from top-k or sort over the F neurons; otherwise the
op checks them on each call (see _index_range_reason).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen import sparse_mlp as sparse_mlp_codegen
from runtime.dispatch import FusedOp, Kernel


def masked_sparse_mlp_reference(x, w1, b1, w2, b2, mask, *, activation: str, keeps: bool | None = None):
    """The masked form as eager writes it: fc2(act(fc1(x)) * mask), or with `keeps`
    fc2(where(mask == keeps, act(fc1(x)), 0))."""
    activated = sparse_mlp_codegen.ACTIVATIONS[activation](F.linear(x, w1, b1))
    selected = activated * mask if keeps is None else torch.where(mask == keeps, activated, 0.0)
    return F.linear(selected, w2, b2)


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

    def describe(self) -> str:
        biases = [name for name, present in (("b1", self.has_b1), ("b2", self.has_b2)) if present]
        form = self.form if self.mask_keeps is None else f"{self.form} (selected where mask is {self.mask_keeps})"
        return f"{form}, bias {'+'.join(biases) or 'none'}"


def _index_range_reason(idx: torch.Tensor, ffn: int) -> str | None:
    """On CUDA an asynchronous device assert (no host sync on the decode path: out-of-range
    indices stop the program with an error, never a wrong answer); on the CPU a plain check
    that leaves bad indices to PyTorch, which raises or wraps them as eager does."""
    if not idx.numel():
        return None
    if idx.is_cuda:
        torch._assert_async(((idx >= 0) & (idx < ffn)).all(), f"flashfx: sparse MLP indices outside [0, {ffn})")
        return None
    if int(idx.min()) < 0 or int(idx.max()) >= ffn:
        return f"indices outside [0, {ffn}) (left to PyTorch, which raises or wraps them)"
    return None


class SparseMLPOp(FusedOp):
    pattern = "sparse_mlp"

    def __init__(self, replaced, activation: str, layout: SparseMLPLayout, mode: str = "default"):
        super().__init__(tuple(replaced), mode)
        self.activation = activation
        self.layout = layout
        self._w2_column_major: tuple | None = None

    # -- call ------------------------------------------------------------------------
    def forward(self, x, *operands):
        w1, b1, w2, b2, selector = self._unpack(operands)
        rows = x.reshape(-1, x.shape[-1])
        reason = self.why_not_kernel([t for t in (x, w1, b1, w2, b2, selector) if t is not None])
        idx = selector
        if reason is None and self.layout.form == "masked":
            keeps = self.layout.mask_keeps
            idx, reason = self._kept_neurons(selector if keeps is None else selector == keeps, w1.shape[0], rows.shape[0])
            if reason is None and keeps is None and not torch.isfinite(rows).all():
                reason = "non-finite inputs: eager's act(fc1(x)) * mask turns a dropped inf into NaN (inf * 0)"
        if reason is None and not self.layout.indices_proven:
            reason = _index_range_reason(idx, w1.shape[0])
        if idx is not None and idx.dim() == 1 and idx.stride(0) != 1:
            idx = idx.contiguous()
        reason = reason or sparse_mlp_codegen.unsupported_reason(rows, w1, b1, w2, b2, idx, activation=self.activation)
        if reason is not None:
            self.fell_back(reason)
            return self._reference(x, w1, b1, w2, b2, selector)
        out = self._launch(rows, w1, b1, w2, b2, idx)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def output_like(self, x, *operands):
        w2 = self._unpack(operands)[2]
        return torch.empty((*x.shape[:-1], w2.shape[0]), dtype=x.dtype, device=x.device)

    def _unpack(self, operands):
        """(w1 (F, D), b1, w2 (D, F), b2, idx or mask) from the operands the pass wired in."""
        operands = list(operands)
        w1 = operands.pop(0)
        b1 = operands.pop(0) if self.layout.has_b1 else None
        w2 = operands.pop(0)
        b2 = operands.pop(0) if self.layout.has_b2 else None
        (selector,) = operands
        w1 = w1.t() if self.layout.w1_transposed else w1
        w2 = w2.t() if self.layout.w2_transposed else w2
        return w1, b1, w2, b2, selector

    def _kept_neurons(self, mask: torch.Tensor, ffn: int, rows: int) -> tuple[torch.Tensor | None, str | None]:
        """(idx, None) when the masked form equals the gathered form with idx; else (None, why not)."""
        if rows == 0:
            return None, "empty batch"
        if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
            return None, "the mask has values other than 0 and 1 (it scales neurons)"
        keep = (mask != 0).reshape(-1, ffn)
        if keep.shape[0] > 1 and not torch.equal(keep, keep[:1].expand_as(keep)):
            return None, "mask rows keep different neurons (the kernels share one set across rows)"
        idx = keep[0].nonzero().squeeze(1)
        if idx.numel() == 0:
            return None, "the mask keeps no neuron"
        return idx, None

    # -- kernels ---------------------------------------------------------------------
    def spec(self) -> sparse_mlp_codegen.SparseMLPSpec:
        return sparse_mlp_codegen.SparseMLPSpec(self.activation)

    def kernel_for(self, spec) -> tuple[object, Kernel]:
        return self.load_kernel(spec, sparse_mlp_codegen.kernel_name, sparse_mlp_codegen.render_sparse_mlp)

    def prepare(self) -> None:
        """Generate (render, store, load) the kernels this op launches."""
        self.kernel_for(self.spec())

    def _launch(self, rows, w1, b1, w2, b2, idx):
        module, kernel = self.kernel_for(self.spec())
        sm_count = torch.cuda.get_device_properties(rows.device).multi_processor_count if rows.is_cuda else None
        sizes = (rows.shape[0], rows.shape[1], idx.shape[0])
        out = torch.empty_like(rows)
        w2_columns = self._column_major(w2)

        def run(config):
            return module.launch(rows, w1, b1, w2_columns, b2, idx, out, activation=self.activation, config=config)

        config = self.tuned_config(
            kernel, sizes, rows,
            default=lambda: sparse_mlp_codegen.default_config(*sizes, sm_count=sm_count),
            candidates=lambda: sparse_mlp_codegen.config_space(*sizes, sm_count=sm_count),
            run=run,
        )
        return run(config)

    def _column_major(self, w2: torch.Tensor) -> torch.Tensor:
        """W2 with contiguous columns: w2 itself when it is already, else a copy kept while w2 is unchanged."""
        if w2.stride(0) == 1:
            return w2
        key = (w2.data_ptr(), w2._version, tuple(w2.shape), w2.stride(), w2.dtype, w2.device)
        cached = self._w2_column_major
        if cached is None or cached[0]() is not w2 or cached[1] != key:
            cached = (weakref.ref(w2), key, sparse_mlp_codegen.column_major(w2))
            self._w2_column_major = cached
        return cached[2]

    def _reference(self, x, w1, b1, w2, b2, selector):
        if self.layout.form == "masked":
            return masked_sparse_mlp_reference(x, w1, b1, w2, b2, selector, activation=self.activation,
                                               keeps=self.layout.mask_keeps)
        return sparse_mlp_codegen.sparse_mlp_reference(x, w1, b1, w2, b2, selector, activation=self.activation)

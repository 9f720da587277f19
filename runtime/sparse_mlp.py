"""Run time of the fused contextual-sparsity MLP (DejaVu): launch the gather kernels or fall back.

The sparse-MLP pass hands over the MLP's operands as the graph holds them, plain or gated

    h = act(x W1^T + b1)                             plain (fc1, fc2)
    h = act(x W1^T + b1) * up_act(x W3^T + b3)       gated (gate_proj, up_proj; w1, w3 in Meta's Llama)
    gathered:  y = h[idx] W2[:, idx]^T + b2          (W1[idx], b1[idx], ... in the graph) idx (K,)
    masked:    y = (h * mask) W2^T + b2              mask (..., F) bool or float, or as a selection
               y = where(mask == keeps, h, 0) W2^T + b2 (where / masked_fill with 0); the mask or
               selection may sit on h, or (gated) on its gate or up factor alone

and the op computes exactly that, in x's dtype, for x of any rank (leading dims are rows):

    rows = x.reshape(M, D)
    idx  = gathered: idx
           masked:   the neurons some row's mask keeps; when rows keep different neurons or the
                     mask scales them, each row's mask (M, F) goes to the kernels too, which apply
                     it to h (a shared 0/1 mask is the gathered form exactly)
    out  = codegen.sparse_mlp launch(rows, W1, b1, [W3, b3,] column-major W2, b2, idx[, row mask])
           or its reference

Weights arrive as graph inputs on every call. The down kernel reads the selected columns of W2,
contiguous only in a column-major copy; the op keeps one, rebuilt when W2 changes (another
tensor, storage or in-place version). The kernels do not range-check gathered indices: the
pass proves them in [0, F) when they come from top-k or sort over the F neurons; otherwise the
op checks them on each call (see _index_range_reason).

A product with a dropped neuron's 0 is NaN in eager where a factor is inf or NaN; with finite
inputs the op matches that by running the kernels, with non-finite ones it falls back. (A
product that overflows to inf in a dropped neuron, eager's NaN, is the kernels' 0.)
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen import sparse_mlp as sparse_mlp_codegen
from ir.fused import SparseMLPLayout
from codegen.launching import fresh
from runtime.bound import Bound, FastCall, Launch
from runtime.dispatch import NEVER, SPARSE_RECOMPUTED, FusedOp, Kernel
from runtime.plans import NO_PLAN_YET, Allocation, Recomputed, View, views_between


@dataclass
class Weights:
    """An MLP's weights as canonical matrices: w1/w3 (F, D), w2 (D, F); w3 None unless gated."""

    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    w3: torch.Tensor | None = None
    b3: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w1, self.b1, self.w3, self.b3, self.w2, self.b2) if t is not None]

    @property
    def ffn(self) -> int:
        return self.w1.shape[0]


def masked_sparse_mlp_reference(x, weights: Weights, mask, *, activation: str, up_activation: str = "identity",
                                keeps: bool | None = None, selects: str = "h", zero_is_product: bool = False):
    """The masked form as eager writes it: fc2(act(fc1(x)) * mask), or with `keeps`
    fc2(where(mask == keeps, act(fc1(x)), 0)) (0 * act(fc1(x)) when `zero_is_product`); gated,
    h = act(gate(x)) * up_act(up(x)) with the mask on `selects`: "h", or the "gate" or "up" factor."""
    def select(t):
        if keeps is None:
            return t * mask
        return torch.where(mask == keeps, t, t * 0 if zero_is_product else 0.0)

    factors = {"gate": sparse_mlp_codegen.ACTIVATIONS[activation](F.linear(x, weights.w1, weights.b1))}
    if weights.w3 is not None:
        factors["up"] = sparse_mlp_codegen.UP_ACTIVATIONS[up_activation](F.linear(x, weights.w3, weights.b3))
    if selects in factors:
        factors[selects] = select(factors[selects])
    h = factors["gate"] * factors["up"] if "up" in factors else factors["gate"]
    return F.linear(select(h) if selects == "h" else h, weights.w2, weights.b2)


def _rows(weight, bias, rows: tuple[int, int] | None):
    """The neurons' rows of a merged weight and bias (views), or both as they are."""
    if rows is None:
        return weight, bias
    return weight[rows[0]:rows[1]], None if bias is None else bias[rows[0]:rows[1]]


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


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """x's leading dims as one of rows: (M, D)."""
    return x.reshape(-1, x.shape[-1])


@dataclass(frozen=True)
class _SparseMLPPlan:
    weights: tuple  # the canonical weights' fields (w1, b1, w2, b2, w3, b3) from the graph's operands
    rows: object  # x as (M, D) rows
    reason: str | None  # why the kernels cannot take operands of this signature
    gathered_reason: str | None  # the gathered form: why not, from the operands' metadata and idx's
    launch: Launch
    out: Allocation  # the graph's output
    out_rows: View  # the output as the kernels' (M, D) rows


class SparseMLPOp(FusedOp):
    """DejaVu's MLP. In training the forward runs the gather kernels and the backward recomputes
    the gathered reference under autograd (SPARSE_RECOMPUTED): the sparse forward's gradients."""

    pattern = "sparse_mlp"
    recompute_reason = SPARSE_RECOMPUTED

    def __init__(self, replaced, activation: str, layout: SparseMLPLayout, mode: str = "default",
                 up_activation: str = "identity"):
        super().__init__(tuple(replaced), mode)
        self.activation = activation
        self.up_activation = up_activation
        self.layout = layout
        self._w2_column_major: tuple | None = None

    # -- call ------------------------------------------------------------------------
    def forward(self, x, *operands):
        key = self.plan_key([x, *operands])
        plan = self._plans.get(key, NO_PLAN_YET)
        if plan is NO_PLAN_YET:
            plan = self._plans.remember(key, self._plan(x, *operands))
        *raw, selector = self._by_role(operands)
        weights = Weights(*(view.of(t) for view, t in zip(plan.weights, raw)))
        reason, idx, row_mask = plan.reason, selector, None
        if reason is None and self.layout.form == "masked":
            idx, row_mask, reason = self._masked_selection(x, selector, weights.ffn)
        if reason is None and not self.layout.indices_proven:
            reason = _index_range_reason(idx, weights.ffn)
        if idx is not None and idx.dim() == 1 and idx.stride(0) != 1:
            idx = idx.contiguous()
        rows = plan.rows.of(x)
        if reason is None:
            reason = plan.gathered_reason if self.layout.form == "gathered" else self._unsupported_reason(
                rows, weights, idx, row_mask)
        if reason is not None:
            self.fell_back(reason)
            return self._reference(x, weights, selector)
        out = plan.out.new(x.device)
        self._launch(rows, weights, idx, row_mask, plan.out_rows.of(out), plan.launch)
        return out

    def fast_path(self, operands):
        """The gathered form with indices proven in range: the planned views, W2's column-major copy
        where W2's strides (decided by the signature) need one (a fresh call, checked per call), the
        output's allocation and the bound launch, as one FastCall."""
        if self.differentiable or self.layout.form != "gathered" or not self.layout.indices_proven:
            return NEVER
        plan = self._plans.get(self.plan_key(operands))
        if (plan is None or plan.reason is not None or plan.gathered_reason is not None
                or not isinstance(plan.launch.bound, Bound)):
            return None
        weight_views, rows_view, allocation, out_rows, bound = (plan.weights, plan.rows, plan.out, plan.out_rows,
                                                                plan.launch.bound)
        w2 = weight_views[2].of(self._by_role(operands[1:])[2])
        copies_w2 = self._column_major(w2) is not w2

        def launched(x, *operands):
            *raw, idx = self._by_role(operands)
            weights = Weights(*(view.of(t) for view, t in zip(weight_views, raw)))
            if idx.dim() == 1 and idx.stride(0) != 1:
                idx = idx.contiguous()
            w2_columns = fresh(self._column_major, weights.w2) if copies_w2 else weights.w2
            out = allocation.fresh(x.device)
            bound(*self._launch_tensors(rows_view.of(x), weights, idx, out_rows.of(out), w2_columns))
            return out

        return FastCall(launched)

    def _plan(self, x, *operands) -> _SparseMLPPlan:
        """What calls of these operands' signature decide (runtime.plans): the canonical weights' and
        the rows' views, why the kernels cannot take them (beyond the selection's values), the launch."""
        *raw, selector = self._by_role(operands)
        weights = self._canonical(*raw)
        rows = _rows_of(x)
        reason = self.why_not_kernel([x, *weights.tensors(), selector])
        gathered = None if reason or self.layout.form == "masked" else self._unsupported_reason(
            rows, weights, selector, None)
        fields = [weights.w1, weights.b1, weights.w2, weights.b2, weights.w3, weights.b3]
        out_rows = torch.empty((rows.shape[0], weights.w2.shape[0]), dtype=x.dtype, device=x.device)
        out = out_rows.view(*x.shape[:-1], out_rows.shape[1])
        return _SparseMLPPlan(views_between(raw, fields), View.between(x, rows) or Recomputed(_rows_of), reason,
                              gathered, Launch(*self.kernel_for(self.spec())), Allocation.like(out),
                              View.between(out, out_rows))

    def _unsupported_reason(self, rows, weights: Weights, idx, row_mask) -> str | None:
        return sparse_mlp_codegen.unsupported_reason(
            rows, weights.w1, weights.b1, weights.w2, weights.b2, idx, activation=self.activation,
            w3=weights.w3, b3=weights.b3, up_activation=self.up_activation, row_mask=row_mask)

    def output_like(self, x, *operands):
        w2 = self._unpack(operands)[0].w2
        return torch.empty((*x.shape[:-1], w2.shape[0]), dtype=x.dtype, device=x.device)

    def _unpack(self, operands) -> tuple[Weights, torch.Tensor]:
        """(canonical weights, idx or mask) from the operands the pass wired in."""
        *raw, selector = self._by_role(operands)
        return self._canonical(*raw), selector

    def _by_role(self, operands) -> tuple:
        """(w1, b1, w2, b2, w3, b3, idx or mask) as the pass wired them in, None where absent:
        w1, [b1], [w3, [b3]], w2, [b2], idx or mask."""
        operands, layout = list(operands), self.layout
        w1 = operands.pop(0)
        b1 = operands.pop(0) if layout.has_b1 else None
        w3 = operands.pop(0) if layout.gated else None
        b3 = operands.pop(0) if layout.has_b3 else None
        w2 = operands.pop(0)
        b2 = operands.pop(0) if layout.has_b2 else None
        (selector,) = operands
        return w1, b1, w2, b2, w3, b3, selector

    def _canonical(self, w1, b1, w2, b2, w3, b3) -> Weights:
        """The weights as canonical matrices: untransposed, merged ones split into their rows."""
        layout = self.layout
        transposed = {"w1": layout.w1_transposed, "w2": layout.w2_transposed, "w3": layout.w3_transposed}
        w1, w2, w3 = (w.t() if w is not None and transposed[name] else w
                      for name, w in (("w1", w1), ("w2", w2), ("w3", w3)))
        (w1, b1), (w3, b3) = _rows(w1, b1, layout.w1_rows), _rows(w3, b3, layout.w3_rows)
        return Weights(w1, b1, w2, b2, w3, b3)

    def _masked_selection(self, x, mask, ffn: int):
        """(idx, row mask or None, None) for a mask the kernels compute exactly, else (None, None, why not).

        idx: the neurons some row keeps. The row mask (M, F), each row's mask values, goes to the
        kernels unless every row keeps the same neurons with 0/1 values (then idx alone says it all)."""
        keeps = self.layout.mask_keeps
        values = mask if keeps is None else mask == keeps
        if x.numel() == 0:
            return None, None, "empty batch"
        rows = values.expand(*x.shape[:-1], ffn).reshape(-1, ffn)
        kept = rows != 0
        idx = kept.any(0).nonzero().squeeze(1)
        if idx.numel() == 0:
            return None, None, "the mask keeps no neuron"
        if self.layout.drops_by_product and not torch.isfinite(x).all():
            return None, None, "non-finite inputs: eager's act(fc1(x)) * mask turns a dropped inf into NaN (inf * 0)"
        binary = rows.dtype == torch.bool or bool(torch.all((rows == 0) | (rows == 1)))
        shared = binary and torch.equal(kept, kept[:1].expand_as(kept))
        return idx, None if shared else rows, None

    # -- kernels ---------------------------------------------------------------------
    def spec(self) -> sparse_mlp_codegen.SparseMLPSpec:
        return sparse_mlp_codegen.SparseMLPSpec(self.activation, self.layout.gated, self.up_activation)

    def kernel_for(self, spec) -> tuple[object, Kernel]:
        return self.load_kernel(spec, sparse_mlp_codegen.kernel_name, sparse_mlp_codegen.render_sparse_mlp)

    def prepare(self) -> None:
        """Generate (render, store, load) the kernels this op launches."""
        self.kernel_for(self.spec())

    def _launch(self, rows, weights: Weights, idx, row_mask, out_rows, launch: Launch):
        sm_count = self._sm_count(rows.device)
        sizes = (rows.shape[0], rows.shape[1], idx.shape[0])
        tensors = self._launch_tensors(rows, weights, idx, out_rows, self._column_major(weights.w2))
        options = {"up_activation": self.up_activation} if self.layout.gated else {}

        def run(launcher):
            return launcher(*tensors, activation=self.activation, row_mask=row_mask, checked=True, **options)

        gated = self.layout.gated

        def default():
            return sparse_mlp_codegen.default_config(*sizes, sm_count=sm_count, gated=gated)

        def candidates():
            return sparse_mlp_codegen.config_space(*sizes, sm_count=sm_count, gated=gated)

        if self.layout.form == "masked":  # the selection's size, a key of the config and the grid, comes from values
            def run_with(config):
                return run(functools.partial(launch.module.launch, config=config))

            return run_with(self.tuned_config(launch.kernel, sizes, rows, default, candidates, run_with))
        return self.run_planned(launch, lambda: (sizes, default, candidates), rows, run)

    def _launch_tensors(self, rows, weights: Weights, idx, out, w2_columns) -> list[torch.Tensor | None]:
        """The launcher's positional tensors: rows, w1, b1 (w3, b3 when gated), W2 with contiguous
        columns (`_column_major`), b2, idx, out (which it returns)."""
        projections = [weights.w1, weights.b1] + ([weights.w3, weights.b3] if self.layout.gated else [])
        return [rows, *projections, w2_columns, weights.b2, idx, out]

    @staticmethod
    @functools.cache
    def _sm_count(device: torch.device) -> int | None:
        return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None

    @property
    def host_sync_reason(self) -> str | None:
        if self.layout.form == "masked":
            return "the neurons its mask keeps are found on the host (their number sizes the launch)"
        return None

    def _column_major(self, w2: torch.Tensor) -> torch.Tensor:
        """W2 with contiguous columns: w2 itself when it is already, else a copy kept while w2 is unchanged.
        Compiled for CUDA graphs, w2 itself: a replay would not see w2 change, and so could not renew
        the copy (the down kernel then reads the selected columns with stride F, uncoalesced)."""
        if w2.stride(0) == 1 or self.sync_free:
            return w2
        owner = w2 if w2._base is None else w2._base  # a view made per call (a transpose) is new each time
        key = (w2.data_ptr(), w2._version, w2.shape, w2.stride(), w2.dtype)  # (the device is the owner's)
        cached = self._w2_column_major
        if cached is None or cached[0]() is not owner or cached[1] != key:
            cached = (weakref.ref(owner), key, sparse_mlp_codegen.column_major(w2))
            self._w2_column_major = cached
        return cached[2]

    def _reference(self, x, weights: Weights, selector):
        if self.layout.form == "masked":
            return masked_sparse_mlp_reference(x, weights, selector, activation=self.activation,
                                               up_activation=self.up_activation, keeps=self.layout.mask_keeps,
                                               selects=self.layout.selects, zero_is_product=self.layout.zero_is_product)
        if self.layout.gated:
            return sparse_mlp_codegen.gated_sparse_mlp_reference(
                x, weights.w1, weights.b1, weights.w3, weights.b3, weights.w2, weights.b2, selector,
                activation=self.activation, up_activation=self.up_activation)
        return sparse_mlp_codegen.sparse_mlp_reference(x, weights.w1, weights.b1, weights.w2, weights.b2, selector,
                                                       activation=self.activation)

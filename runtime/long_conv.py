"""Run time of the fused long- and short-convolution ops: view graph tensors as kernel rows, launch
the generated kernel, or fall back to PyTorch.

The long_conv pass proves that a subgraph computes, for u (*batch, *channels, L) and a filter k
(*channels, Lk) shared by every batch row,

    out = post_gate * (scale * causal_conv(v, k) + skip_scale * D * v),   v = u * pre_gate

(D, pre_gate, post_gate optional; the pre gate broadcast to u's shape, D per channel, the post
gate to the output's). u may lack channel dims the filter has (S4's several output channels per
input channel): the op views it in the output's dims (`signal_dims`) and broadcasts it over the
filters (a copy); k may lack channel dims u has (one filter for several heads): it is viewed in
them (`filter_dims`) and broadcast over them (a copy of the filter). With a `period`, k is the
filter of a circular convolution of that period (a filter longer than L, a bidirectional one, or
any spectrum's inverse transform). Graphs that hold time at another dim (time-major (B, L, H)
code) get views with it moved last. At run time the op views u, the gates and the output as
(B, H, L) rows and k as (H, Lk), computes the filter's spectrum once per call (shared by all batch
rows: the generated module's spectrum kernel, or codegen.long_conv.filter_spectrum's torch.fft for
circular and fp64 filters and in the backward, under autograd) and launches the kernel, or runs
codegen.long_conv.long_conv_reference.

The short_conv pass proves that a subgraph computes act(bias + causal depthwise conv1d(x, w))
for x (B, C, L) and nn.Conv1d's weight w (C, 1, K); the op launches codegen.short_conv's kernel
on w viewed as (C, K), or runs short_conv_reference.

Both allocate their output the way eager code produced it: its shape and dtype, dense, with the
dims in the order of the eager tensor's strides ((B, L, H) tensors seen transposed stay so).
Their backward kernels are mixed in from runtime/conv_backward.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen import long_conv as long_conv_codegen
from codegen import short_conv as short_conv_codegen
from codegen.launching import fresh
from runtime.bound import Bound, FastCall, Launch
from runtime.conv_backward import LongConvBackward, ShortConvBackward, time_last
from ir.fused import LongConvLayout, OutputLayout
from ir.limits import KERNEL_DTYPES
from runtime.dispatch import NEVER, FusedOp, Kernel
from runtime.plans import NO_PLAN_YET, Allocation, Recomputed, View, views_between


@dataclass
class Rows:
    """The operands of one call in the kernel's layout."""

    u: torch.Tensor  # (B, H, L)
    k: torch.Tensor  # (H, Lk)
    D: torch.Tensor | None  # (H,)
    pre_gate: torch.Tensor | None  # (B, H, L)
    post_gate: torch.Tensor | None  # (B, H, L)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.u, self.k, self.D, self.pre_gate, self.post_gate) if t is not None]


def _viewed(tensor: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """`tensor` (time last) with `dims` before time, or as it is for None."""
    return tensor if dims is None else tensor.reshape(*dims, tensor.shape[-1])


def _periodic(k: torch.Tensor, period: int) -> torch.Tensor:
    """k cropped or zero-padded to `period` taps, as rfft(k, n=period) reads it."""
    return F.pad(k, (0, period - k.shape[-1])) if k.shape[-1] < period else k[..., :period]


class LongConvOp(LongConvBackward, FusedOp):
    pattern = "long_conv"

    def __init__(self, replaced, layout: LongConvLayout, scale: float = 1.0, skip_scale: float = 1.0,
                 mode: str = "default"):
        super().__init__(tuple(replaced), mode)
        self.layout = layout
        self.scale = scale
        self.skip_scale = skip_scale
        self.spec = long_conv_codegen.LongConvSpec(layout.has_D, layout.has_pre_gate, layout.has_post_gate)

    @property
    def circular(self) -> bool:
        """Is k the filter of a circular convolution (of period layout.period)?"""
        return self.layout.period is not None

    # -- call ------------------------------------------------------------------------
    def forward(self, u, k, *rest):
        key = self.plan_key([u, k, *rest])
        plan = self._plans.get(key, NO_PLAN_YET)
        if plan is NO_PLAN_YET:
            plan = self._plans.remember(key, self._plan(u, k, *rest))
        if plan.reason is None and plan.rows is not None:
            return self._convolve(plan, (u, k, *rest))
        operands = [view.of(t) for view, t in zip(plan.time_last, (u, k, *rest))]
        out = plan.out.new(u.device)
        rows = self.rows_of(*operands) if plan.rows is None else self._planned_rows(plan, operands)
        out_rows = plan.out_rows.of(out)
        if plan.reason is None:
            self._launch(rows, out_rows, plan.launch)
        else:
            self.fell_back(plan.reason)
            out_rows.copy_(self._reference(rows, out.dtype))
        return plan.graph_out.of(out)

    def _convolve(self, plan: _LongConvPlan, tensors) -> torch.Tensor:
        """The kernel's call of a plan whose rows are views: views, the output's allocation, the
        filter's spectrum and the launch, each replayable (runtime.bound)."""
        operands = [view.of(t) for view, t in zip(plan.time_last, tensors)]
        out = plan.out.fresh(tensors[0].device)
        self._launch(self._planned_rows(plan, operands), plan.out_rows.of(out), plan.launch)
        return plan.graph_out.of(out)

    def _planned_rows(self, plan: _LongConvPlan, operands) -> Rows:
        return Rows(*(view.of(t) for view, t in zip(plan.rows, self._row_sources(operands))))

    def fast_path(self, operands):
        """A plan whose rows are views: `_convolve`, as one FastCall."""
        if self.differentiable:
            return NEVER
        plan = self._plans.get(self.plan_key(operands))
        if plan is None or plan.reason is not None or plan.rows is None or not isinstance(plan.launch.bound, Bound):
            return None
        return FastCall(lambda *tensors: self._convolve(plan, tensors))

    def output_like(self, u, k, *rest):
        time = self.layout.time
        if time == -1:
            return self.layout.out.empty(self._out_shape(u, k), u.device)
        return self.layout.out.empty(self._out_shape(time_last(u, time), time_last(k, time)),
                                     u.device).movedim(-1, time)

    def _out_shape(self, u, k) -> torch.Size:
        """u's shape broadcast over the filter's channel dims (time last)."""
        u, k = _viewed(u, self.layout.signal_dims), _viewed(k, self.layout.filter_dims)
        return torch.Size((*torch.broadcast_shapes(u.shape[:-1], k.shape[:-1]), u.shape[-1]))

    def _plan(self, u, k, *rest) -> _LongConvPlan:
        """What calls of these operands' signature decide (runtime.plans): the views, with time last,
        of the operands, of their kernel rows (None where one copies or scales: then rows_of per call)
        and of the output; why the kernel cannot take them; the launch."""
        operands = [self._time_last(t) for t in (u, k, *rest)]
        out = self.layout.out.empty(self._out_shape(*operands[:2]), u.device)
        rows = self.rows_of(*operands)
        out_rows = out.view(rows.u.shape)
        reason = (self.why_not_kernel(rows.tensors())
                  or long_conv_codegen.unsupported_reason(rows.u, rows.k, rows.D, rows.pre_gate, rows.post_gate,
                                                          out_rows, circular=self.circular))
        launch = None if reason else Launch(*self.kernel_for(self.spec))
        graph_out = out if self.layout.time == -1 else out.movedim(-1, self.layout.time)
        row_fields = [rows.u, rows.k, rows.D, rows.pre_gate, rows.post_gate]
        return _LongConvPlan(views_between([u, k, *rest], operands), views_between(self._row_sources(operands), row_fields),
                             Allocation.like(out), View.between(out, out_rows), View.between(out, graph_out), reason,
                             launch)

    def _time_last(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.layout.time == -1 else time_last(tensor, self.layout.time)

    def _row_sources(self, operands) -> list:
        """The operands (time last) each of the Rows' fields is made from: u, k, D, pre_gate, post_gate."""
        u, k, *rest = operands
        return [u, k, *self._unpack(rest)]

    def rows_of(self, u, k, *rest) -> Rows:
        """The kernel's view of the operands (time last), in the forward and (under autograd) the backward."""
        return self._rows(u, k, *self._unpack(rest), self._out_shape(u, k))

    def _unpack(self, rest):
        """(D, pre_gate, post_gate) from the operands after u and k, None where the graph has none."""
        rest = list(rest)
        return tuple(rest.pop(0) if present else None
                     for present in (self.layout.has_D, self.layout.has_pre_gate, self.layout.has_post_gate))

    def _rows(self, u, k, D, pre_gate, post_gate, out_shape: torch.Size) -> Rows:
        batch = math.prod(out_shape[:self.layout.batch_dims])
        channel_shape = out_shape[self.layout.batch_dims:-1]
        shape = (batch, math.prod(channel_shape), out_shape[-1])
        if D is not None:
            D = torch.broadcast_to(D, torch.broadcast_shapes(D.shape, (*channel_shape, 1))).reshape(shape[1])
            D = D * self.skip_scale if self.skip_scale != 1.0 else D
        if pre_gate is not None:
            pre_gate = self._signal_rows(pre_gate.expand(u.shape), out_shape, shape)
        post_gate = None if post_gate is None else post_gate.expand(out_shape).reshape(shape)
        return Rows(self._signal_rows(u, out_shape, shape), self._filter_rows(k, channel_shape), D, pre_gate,
                    post_gate)

    def _filter_rows(self, k, channel_shape: torch.Size) -> torch.Tensor:
        """k as (H, taps) rows: viewed in the output's dims, cropped or padded to its period, its batch
        dims (of size 1) dropped, broadcast over channel dims it lacks (a copy of the filter)."""
        k = _viewed(k, self.layout.filter_dims)
        if self.circular:
            k = _periodic(k, self.layout.period)
        k = k.reshape(k.shape[max(0, k.dim() - len(channel_shape) - 1):])
        return k.expand(*channel_shape, k.shape[-1]).reshape(math.prod(channel_shape), k.shape[-1])

    def _signal_rows(self, u, out_shape: torch.Size, shape: tuple[int, int, int]) -> torch.Tensor:
        """u (or the pre gate) as (B, H, L) rows of the output: a view, unless u is broadcast over
        several filters per channel (then a copy)."""
        return _viewed(u, self.layout.signal_dims).expand(out_shape).reshape(shape)

    # -- kernels ---------------------------------------------------------------------
    def kernel_for(self, spec) -> tuple[object, Kernel]:
        return self.load_kernel(spec, long_conv_codegen.kernel_name, long_conv_codegen.render_long_conv)

    def prepare(self) -> None:
        """Generate (render, store, load) the kernel this op launches."""
        self.kernel_for(self.spec)

    def filter_spectrum(self, k: torch.Tensor, seqlen: int) -> torch.Tensor:
        """The spectrum of k (H, Lk) the kernels multiply by, forward and (conjugated) backward."""
        return long_conv_codegen.filter_spectrum(k, seqlen, scale=self.scale, circular=self.circular)

    def _spectrum(self, rows: Rows, launch: Launch) -> torch.Tensor:
        """The forward's filter spectrum: by the generated module's spectrum kernel (one launch, with
        fp32 accuracy: SPECTRUM_PRECISION) for a causal filter of a kernel dtype; else by filter_spectrum
        (torch.fft, in fp64 for fp64 k)."""
        k, seqlen = rows.k, rows.u.shape[-1]
        if self.circular or k.dtype not in KERNEL_DTYPES:
            return fresh(self.filter_spectrum, k, seqlen)
        return launch.module.spectrum(k, seqlen, scale=self.scale,
                                      precision=long_conv_codegen.SPECTRUM_PRECISION[rows.u.dtype])

    def _launch(self, rows: Rows, out: torch.Tensor, launch: Launch) -> None:
        seqlen = rows.u.shape[-1]
        k_f = self._spectrum(rows, launch)

        def tuning():
            plan = long_conv_codegen.plan_of(k_f, seqlen)
            return ((seqlen,), lambda: long_conv_codegen.default_config(plan),
                    lambda: long_conv_codegen.config_space(plan))

        self.run_planned(launch, tuning, rows.u, lambda launcher: launcher(
            rows.u, k_f, out, D=rows.D, pre_gate=rows.pre_gate, post_gate=rows.post_gate))

    def _reference(self, rows: Rows, out_dtype: torch.dtype) -> torch.Tensor:
        """long_conv_reference, computing in at least the output's precision."""
        u = rows.u.to(torch.promote_types(rows.u.dtype, out_dtype))
        return long_conv_codegen.long_conv_reference(u, rows.k, D=rows.D, pre_gate=rows.pre_gate,
                                                     post_gate=rows.post_gate, scale=self.scale,
                                                     circular=self.circular)


@dataclass(frozen=True)
class _LongConvPlan:
    time_last: tuple  # the operands with time last
    rows: tuple | None  # the Rows' fields from their sources (_row_sources), or None: rows_of per call
    out: Allocation  # the output, time last
    out_rows: View  # the output as the kernel's (B, H, L) rows
    graph_out: View  # the output as the graph holds it
    reason: str | None  # why the kernel cannot take operands of this signature
    launch: Launch | None


class ShortConvOp(ShortConvBackward, FusedOp):
    pattern = "short_conv"

    def __init__(self, replaced, activation: str | None, has_bias: bool, out: OutputLayout,
                 mode: str = "default"):
        super().__init__(tuple(replaced), mode)
        self.activation = activation
        self.has_bias = has_bias
        self.out = out

    # -- call ------------------------------------------------------------------------
    def output_like(self, x, weight, *bias):
        return self.out.empty(x.shape, x.device)

    def forward(self, x, weight, *bias):
        key = self.plan_key([x, weight, *bias])
        plan = self._plans.get(key, NO_PLAN_YET)
        if plan is NO_PLAN_YET:
            plan = self._plans.remember(key, self._plan(x, weight, *bias))
        bias = bias[0] if bias else None
        weight, out = plan.weight.of(weight), plan.out.new(x.device)
        if plan.reason is None:
            self._launch(x, weight, bias, out, plan.launch)
        else:
            self.fell_back(plan.reason)
            x = x.to(torch.promote_types(x.dtype, out.dtype))
            out.copy_(short_conv_codegen.short_conv_reference(x, weight, bias=bias, activation=self.activation))
        return out

    def fast_path(self, operands):
        """The planned weight view and allocation, and the bound launch."""
        if self.differentiable:
            return NEVER
        plan = self._plans.get(self.plan_key(operands))
        if plan is None or plan.reason is not None or not isinstance(plan.launch.bound, Bound):
            return None
        weight_rows, allocation, bound = plan.weight, plan.out, plan.launch.bound

        def convolve(x, weight, *bias):
            out = allocation.fresh(x.device)
            if bias:
                bound(x, weight_rows.of(weight), out, bias=bias[0])
            else:
                bound(x, weight_rows.of(weight), out)
            return out

        return FastCall(convolve)

    def _plan(self, x, weight, *bias) -> _ShortConvPlan:
        """What calls of these operands' signature decide (runtime.plans)."""
        bias = bias[0] if bias else None
        rows = _filter_rows(weight)
        out = self.out.empty(x.shape, x.device)
        reason = (self.why_not_kernel([t for t in (x, rows, bias) if t is not None])
                  or short_conv_codegen.unsupported_reason(x, rows, bias, out, self.activation))
        launch = None if reason else Launch(*self.kernel_for(self.spec_for(rows.shape[1])))
        return _ShortConvPlan(View.between(weight, rows) or Recomputed(_filter_rows), Allocation.like(out), reason,
                              launch)

    # -- kernels ---------------------------------------------------------------------
    def spec_for(self, width: int) -> short_conv_codegen.ShortConvSpec:
        return short_conv_codegen.ShortConvSpec(width, self.has_bias, self.activation)

    def kernel_for(self, spec) -> tuple[object, Kernel]:
        return self.load_kernel(spec, short_conv_codegen.kernel_name, short_conv_codegen.render_short_conv)

    def prepare(self, width: int) -> None:
        """Generate (render, store, load) the kernel this op launches for filters of `width` taps."""
        self.kernel_for(self.spec_for(width))

    def _launch(self, x, weight, bias, out, launch: Launch) -> None:
        def tuning():
            return (tuple(x.shape[1:]), lambda: short_conv_codegen.default_config(x), short_conv_codegen.config_space)

        self.run_planned(launch, tuning, x, lambda launcher: launcher(x, weight, out, bias=bias,
                                                                       activation=self.activation))


def _filter_rows(weight: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d's depthwise weight (C, 1, K) as the kernel's (C, K) rows."""
    return weight.reshape(weight.shape[0], weight.shape[-1])


@dataclass(frozen=True)
class _ShortConvPlan:
    weight: object  # the kernel's (C, K) filter rows from the graph's weight
    out: Allocation
    reason: str | None  # why the kernel cannot take operands of this signature
    launch: Launch | None

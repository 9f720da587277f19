"""Run time of the fused attention op: pick the kernel variant, launch it or fall back.

The attention pass hands over everything it proved about the scores

    scores = (q @ k^T) * scale,  masked by one MaskForm,  out = softmax(scores) @ v
    (with a softcap: scores = softcap * tanh((q @ k^T) * scale) before the mask)

A mask the pass could evaluate at compile time becomes a `static_form` (no mask at all,
or causal with block skipping); a mask known only at run time is passed as a tensor and
applied by the `tensor_form`. A static form derived from module buffers (nanoGPT's
registered tril) is only trusted while the mask the graph computes from them equals the one
it was read from (`folded_mask`, compared on every call: writes through `.data`, `.numpy()` or
the storage bypass the version counter); otherwise the op applies that mask tensor. Compiled for
CUDA graphs (`sync_free`), it applies the mask tensor always: exact without the compare's host
sync, at the cost of the static form's block skipping. A scale
read from module state is recomputed whenever the factors the graph computes change. Two masks applied in turn
(a causal where, then a padding bias) arrive as two tensors with a `chain` form; the op combines
them into one additive bias (combined_bias), which equals eager wherever a row keeps a clearly
visible key, and runs eager's math in PyTorch for calls where some row does not.

Two kernels compute the same semantics; `uses_decode_kernel` picks one by shape:

    q_len <= DECODE_MAX_Q_LEN and kv_len >= DECODE_MIN_KV_LEN   split-KV decode (flash-decoding)
    otherwise                                                   FlashAttention-2 (prefill)

Short queries give FlashAttention-2's grid, (query tiles, batch * q_heads), about one program per
head, each streaming the whole cache: a few dozen programs for batch 1 on a 132-SM GPU, and each
query head of a GQA group reading its kv head again. The decode kernel packs a group's heads and
queries into one tile and splits the keys across programs; it pays one extra small kernel that
merges the splits, which only a cache of a few hundred keys fails to amortise. 64 queries cover
decoding (1) and speculative-decoding trees (Medusa: up to 64 tokens with a tree mask).

Training. An op captured with inputs that require grad (`differentiable`) runs FlashAttention-2's
forward with the row log-sum-exp (never the decode kernel) and returns it as a residual, with the
dropout seed when it drops out; autograd also saves its operands and output. Its backward
(codegen/attention_backward.py) runs the dq kernel, then the dkdv kernel, on the same 4-d
operands, and maps the gradients back to the graph's layouts; a mask that requires grad gets the
gradient the dq kernel stores for the scores, carried back through the mask's broadcast,
scaling and combination by autograd. nn.MultiheadAttention's op saves the attention's output and
recomputes its projections under autograd around the kernels (_AttentionCore). A call whose
forward fell back to PyTorch recomputes its reference under autograd, replaying the saved seed.
Dropout draws a seed from torch's generator per call; the kernels draw Philox bits from it at
each score's index, so the backward regenerates the forward's mask without storing it.
"""
from __future__ import annotations

import functools
import math
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from codegen import attention as attention_codegen
from codegen import attention_backward as backward_codegen
from codegen import attention_decode as decode_codegen
from ir.fused import AttentionLayout, EncoderLayout, MaskForm, MultiheadLayout
from ir.limits import MASKED_OUT
from codegen.launching import fresh, viewed
from runtime import library
from runtime.bound import Bound, FastCall, Launch, direct_once_bound
from runtime.dispatch import NEVER, FusedOp, Kernel, _autograd_on, grad_like
from runtime.interpret import launch_lock
from runtime.plans import IDENTITY, NO_PLAN_YET, views_between

DECODE_MAX_Q_LEN = 64
DECODE_MIN_KV_LEN = 256
SEED_RANGE = 1 << 62  # dropout seeds are drawn from torch's generator in [0, SEED_RANGE)
_replayed_seed: ContextVar[torch.Tensor | None] = ContextVar("flashfx_replayed_seed", default=None)


def uses_decode_kernel(q_len: int, kv_len: int) -> bool:
    """Whether attention of q_len queries over kv_len keys runs the decode kernel (module docstring)."""
    return q_len <= DECODE_MAX_Q_LEN and kv_len >= DECODE_MIN_KV_LEN


def combined_bias(masks: list[torch.Tensor], chain: tuple) -> tuple[torch.Tensor, str | None]:
    """One additive bias for masks applied in turn, and why it differs from eager (None if it does not).

    A bool mask's dropped scores become -inf in the bias. Eager gives them fill (plus what later
    masks add) instead: the same zero weight as long as that stays at or below MASKED_OUT and the
    row has a score well above it. A row whose every bias is that low (padding queries that see
    only padding) gets eager's weights only from eager's math."""
    device = masks[0].device
    bias = torch.zeros((), dtype=torch.float32, device=device)
    dropped_at_most = torch.tensor(-math.inf, device=device)  # the largest value eager gives a dropped score
    for mask, form in zip(masks, chain):
        if mask.dtype == torch.bool:
            bias = torch.where(mask == form.keep_when, bias, -math.inf)
            dropped_at_most = dropped_at_most.clamp(min=form.fill_value)
        else:
            added = mask.float() * form.multiplier
            bias = bias + added
            dropped_at_most = dropped_at_most + added.max()
    failures = torch.stack([torch.isnan(bias).any(), ~(dropped_at_most <= MASKED_OUT),
                            (bias.amax(dim=-1) <= MASKED_OUT / 2).any()]).tolist()  # one host sync
    reasons = ("the masks hold NaN", "a dropped score rises above the masked-out level once later masks add to it",
               "a row of the combined masks keeps no clearly visible key")
    return bias, next((reason for reason, failed in zip(reasons, failures) if failed), None)


def _regrouped_mask(mask: torch.Tensor, written_for: tuple, batch: tuple) -> torch.Tensor:
    """A mask written for scores with batch dims `written_for`, for the same scores regrouped into
    `batch` dims: only its batch dims are expanded (its own query and key dims stay as they are)."""
    mask = mask.reshape((1,) * max(0, 2 - mask.dim()) + tuple(mask.shape))
    return mask.expand(*written_for, *mask.shape[-2:]).reshape(*batch, *mask.shape[-2:])


def _ratio(value: float, compiled: float, exponent: int) -> float:
    """(value / compiled) ** exponent for an exponent of 1 or -1 (compiled is never zero): inf for a
    zero divisor, as eager's division by a zero scale gives."""
    ratio = value / compiled
    return ratio if exponent == 1 else (1.0 / ratio if ratio else math.inf)


def _rescaled(form: MaskForm, ratio: float) -> MaskForm:
    """`form` with its fill (bool masks) or its multiplier (additive ones) scaled by `ratio`."""
    if ratio == 1:
        return form
    if form.kind == "bool":
        return replace(form, fill_value=form.fill_value * ratio)
    return replace(form, multiplier=form.multiplier * ratio)


@dataclass
class AttentionCall:
    """One call's operands as the kernels take them (4-d), and whether they can: `reason` is why not."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    masks: list  # the graph's masks, 4-d (the references apply a chain of them in turn)
    mask: torch.Tensor | None  # the one mask the kernel applies, broadcast to the scores' shape
    form: MaskForm
    out_batch: tuple  # the batch dims of the graph's output
    reason: str | None


@dataclass(kw_only=True)
class _Launch(Launch):
    """A forward kernel launch as a plan keeps it (runtime.bound.Launch), with its spec, output shape
    and the launcher's settings that are not tensors, made on its first launch."""

    spec: attention_codegen.AttentionSpec
    out_shape: tuple  # the kernel's 4-d output
    settings: dict | None = None


@dataclass(frozen=True)
class _AttentionPlan:
    """What one call signature decides (runtime.plans)."""

    operand_views: tuple  # q, k, v and the masks as the kernel's 4-d operands
    mask_shape: tuple | None  # the scores' shape the kernel's mask is broadcast to
    out_batch: tuple
    reason: str | None  # why the kernel cannot take operands of this signature
    launch: _Launch | None  # None when it cannot
    graph_shape: tuple | None  # the graph's output from the kernel's (None: the same)



def _fast_attention(plan: _AttentionPlan, tensor_form: MaskForm | None, out_dtype: torch.dtype):
    """AttentionOp.fast_path's function: q, k, v (and the one mask of a tensor form) -> output."""
    views, bound, graph_shape, mask_shape = plan.operand_views, plan.launch.bound, plan.graph_shape, plan.mask_shape
    out_shape = plan.launch.out_shape
    any_viewed = any(view is not IDENTITY for view in views)

    def attend(*operands):
        q, k, v, *mask = [view.of(x) for view, x in zip(views, operands)] if any_viewed else operands
        out = fresh(torch.empty, out_shape, dtype=out_dtype, device=q.device)
        if mask:
            mask, _ = AttentionOp._mask_operand(mask, tensor_form)
            bound(q, k, v, out, mask=viewed(mask, mask.expand(mask_shape)))
        else:
            bound(q, k, v, out)
        return out if graph_shape is None else out.view(graph_shape)

    return FastCall(attend)


def _same_bytes_test(mask: torch.Tensor, folded: torch.Tensor) -> Callable[[torch.Tensor], bool]:
    """A test that a mask laid out as `mask` is byte for byte `folded`: torch.equal of both read as
    int64 words where their layouts allow it (a bool compare goes element by element, several times
    slower: 2.6 against 1.2 us for 64 x 64 on a CPU), else of the masks themselves. Equal values in
    other bytes (-0.0 for 0.0) fail it."""
    try:
        mask.view(torch.int64)
        words = folded.view(torch.int64)
    except RuntimeError:  # a last dim not of whole words, or strides that are not
        return functools.partial(torch.equal, folded)

    def holds(tensor: torch.Tensor) -> bool:
        try:
            return torch.equal(tensor.view(torch.int64), words)
        except RuntimeError:  # a storage offset inside a word
            return False

    return holds


def _lse_buffer(q_shape: tuple, device) -> torch.Tensor:
    return torch.empty(attention_codegen.lse_shape(q_shape), dtype=torch.float32, device=device)


class _AttentionCore(torch.autograd.Function):
    """Attention inside an op whose other parts PyTorch differentiates (nn.MultiheadAttention's
    projections): the forward hands back the output the kernel already computed, the backward runs
    the backward kernels through `grads_of(dout) -> (dq, dk, dv)`."""

    @staticmethod
    def forward(ctx, grads_of, out, q, k, v):
        ctx.grads_of = grads_of
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        return (None, None, *ctx.grads_of(dout))


class AttentionOp(FusedOp):
    pattern = "attention"
    saves_outputs = True  # the backward reads O (delta = rowsum(dO * O))

    def __init__(self, replaced, scale: float, layout: AttentionLayout,
                 static_form: MaskForm | None, tensor_form: MaskForm | None,
                 folded_mask: torch.Tensor | None = None, mode: str = "default", scale_factors: tuple = (),
                 softcap: float | None = None, mask_scalings: tuple = (), static_dropped: float = -math.inf,
                 dropout_p: float = 0.0, masks_require_grad: bool = False):
        super().__init__(tuple(replaced), mode)
        self.scale = scale
        self.softcap = softcap
        self.dropout_p = dropout_p
        self.layout = layout
        self.static_form = static_form
        self.tensor_form = tensor_form
        # the mask the static form was read from (a copy: it may be the module's buffer itself)
        self._folded_mask = None if folded_mask is None else folded_mask.detach().clone()
        # factors (value, exponent) of the scale read from module state, recomputed when they change;
        # per mask, the factors applied after it (mask_scalings), which scale it too, as in eager
        self.scale_exponents = tuple(exponent for _, exponent in scale_factors)
        self._scale_values = [value for value, _ in scale_factors]
        self._compiled = (scale, list(self._scale_values), static_form, tensor_form)
        self.mask_scalings = mask_scalings
        self._static_dropped = static_dropped  # the largest score the static form's mask leaves a dropped one
        self._static_holds = True  # the static form's dropped scores stay dropped at the current scale
        self._inexact_scale: str | None = None  # why the current scale needs eager's math, if it does
        self._forms_version = 0  # counts the forms' rescalings (a key of the plans)
        self.masks_require_grad = masks_require_grad  # a mask is a learned bias (the dq kernel gives its gradient)

    # -- call ------------------------------------------------------------------------
    def forward(self, q, k, v, *rest):
        return self._attend([q, k, v, *rest])[0]

    def forward_saving(self, *operands):
        """The output and, for training, the backward's residuals: the row log-sum-exp (base 2, fp32,
        codegen.attention.lse_shape of the 4-d q), then the dropout seed when there is dropout."""
        if not self.differentiable:
            return self.forward(*operands), []
        return self._attend(list(operands), saving=True)

    def output_like(self, q, k, v, *rest):
        return torch.empty((*self._out_batch(q, v), q.shape[-2], v.shape[-1]), dtype=self.layout.out_dtype,
                           device=q.device)

    def residuals_like(self, q, k, v, *rest):
        if not self.differentiable:
            return []
        q, _, _, _ = self._to_4d(q, k, v, [])
        return self._residuals(q.shape, q.device)

    def _residuals(self, q_shape: tuple, device) -> list[torch.Tensor]:
        """Empty residuals for a 4-d q: the lse buffer, then the dropout seed."""
        return [_lse_buffer(q_shape, device)] + ([torch.empty(1, dtype=torch.int64, device=device)]
                                                 if self.dropout_p else [])

    def _attend(self, operands, saving: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the graph's output, the residuals when `saving`) for the graph's operands."""
        call, plan = self._planned_call(operands, saving)
        lse = _lse_buffer(call.q.shape, call.q.device) if saving else None
        seed = self._seed(call.q.device) if self.dropout_p else None
        residuals = [lse] + ([seed] if seed is not None else []) if saving else []
        if call.reason is None:
            out = self._launch(call, plan.launch if plan else self._launch_plan(call, saving), lse=lse, seed=seed)
            if plan is None:
                return self._from_4d(out, call.out_batch), residuals
            return (out if plan.graph_shape is None else out.view(plan.graph_shape)), residuals
        self.fell_back(call.reason)
        return self._from_4d(self._reference_of(call, seed), call.out_batch), residuals

    def _planned_call(self, operands, saving: bool) -> tuple[AttentionCall, _AttentionPlan | None]:
        """The call (as _call makes it) and its signature's plan (runtime.plans; None if it has none):
        the kernel views, the metadata reasons and the launch come from the plan, the mask's value
        and the checks on values are made per call."""
        q, k, v, *rest = operands
        masks, factors = self._split_rest(rest)
        if factors:
            self._refresh_scale(factors)
        form = self._choose_form(masks)
        key = self._plan_key(operands, saving, form)
        plan = self._plans.get(key, NO_PLAN_YET)
        if plan is NO_PLAN_YET:
            call = self._call_of(q, k, v, masks, form)
            return call, self._plans.remember(key, self._plan(call, [q, k, v, *masks], saving))
        if plan is None:
            return self._call_of(q, k, v, masks, form), None
        q, k, v, *masks = (view.of(x) for view, x in zip(plan.operand_views, (q, k, v, *masks)))
        mask, inexact = self._mask_operand(masks, form) if form is self.tensor_form else (None, None)
        mask = None if mask is None else mask.expand(plan.mask_shape)
        reason = plan.reason or inexact or self._inexact_scale
        return AttentionCall(q, k, v, masks, mask, form, plan.out_batch, reason), plan

    def _plan_key(self, operands, saving: bool, form: MaskForm) -> tuple:
        """The key of the plan for these operands: plan_key's, with whether the call saves for training,
        the form chosen for the masks and the forms' version (rescalings)."""
        return self.plan_key(operands, saving, form is self.static_form, self._forms_version)

    def fast_path(self, operands):
        """For an op that is not saving for training, with no scale from module state, no chain of masks
        and no dropout: the planned views, the output's allocation, the mask's scaling and the bound
        launch; with a mask folded at compile time, after the compare that decides its form (the full
        path when the mask differs)."""
        if self.differentiable or self.dropout_p or self.scale_exponents:
            return NEVER
        folded = self.static_form is not None and self.tensor_form is not None and not self.sync_free
        form = self.static_form if folded else self._choose_form(operands[3:])
        if form.chain:
            return NEVER
        plan = self._plans.get(self._plan_key(operands, False, form))
        if plan is None or plan.reason is not None or not isinstance(plan.launch.bound, Bound):
            return None
        attend = _fast_attention(plan, form if form is self.tensor_form else None, self.layout.out_dtype)
        if not folded:
            return attend
        holds, full_path = _same_bytes_test(operands[3], self._folded_mask), self._result
        attend = direct_once_bound(attend)

        def attend_while_folded(q, k, v, *masks):
            if not holds(masks[0]):
                return full_path([q, k, v, *masks])  # (which compares the values)
            return attend(q, k, v)

        return attend_while_folded

    def _plan(self, call: AttentionCall, operands: list[torch.Tensor], saving: bool) -> _AttentionPlan | None:
        """The plan of `call`'s signature (made from the call itself), or None where a view copied."""
        views = views_between(operands, [call.q, call.k, call.v, *call.masks])
        if views is None:
            return None
        reason = self._metadata_reason(call.q, call.k, call.v, call.mask)
        launch = self._launch_plan(call, saving) if reason is None else None
        graph_shape = (*call.out_batch, *launch.out_shape[-2:]) if launch else None
        return _AttentionPlan(views, None if call.mask is None else tuple(call.mask.shape), call.out_batch, reason,
                              launch, None if graph_shape == (launch and launch.out_shape) else graph_shape)

    def _call(self, operands) -> AttentionCall:
        q, k, v, *rest = operands
        masks, factors = self._split_rest(rest)
        self._refresh_scale(factors)
        return self._call_of(q, k, v, masks, self._choose_form(masks))

    def _call_of(self, q, k, v, masks, form: MaskForm) -> AttentionCall:
        """The call of the graph's q, k, v and masks, `form` chosen for them."""
        out_batch = self._out_batch(q, v)
        q, k, v, masks = self._to_4d(q, k, v, masks)
        mask, inexact = self._mask_operand(masks, form) if form is self.tensor_form else (None, None)
        if mask is not None:
            mask = mask.expand(torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2])))
        reason = self._metadata_reason(q, k, v, mask) or inexact or self._inexact_scale
        return AttentionCall(q, k, v, masks, mask, form, out_batch, reason)

    def _metadata_reason(self, q, k, v, mask) -> str | None:
        """Why the kernel cannot take these 4-d operands, from their metadata alone."""
        return self.why_not_kernel([q, k, v]) or attention_codegen.unsupported_reason(q, k, v, mask)

    def _seed(self, device) -> torch.Tensor:
        """Dropout's seed for this call: drawn from torch's generator (torch.manual_seed reproduces a
        run), or the saved one while the backward recomputes the forward."""
        replayed = _replayed_seed.get()
        if replayed is not None:
            return replayed
        return torch.randint(SEED_RANGE, (1,), dtype=torch.int64, device=device)

    def _split_rest(self, rest):
        """(masks, the scale factors read from module state) from the operands after v."""
        count = 0 if self.tensor_form is None else max(1, len(self.tensor_form.chain))
        return list(rest[:count]), rest[count:]

    def _refresh_scale(self, factors) -> None:
        """Recompute the scale when the factors the graph computed from module state differ from
        those it was computed from (one host sync per factor), and the masks they scale: a bool
        mask's fill and an additive one's multiplier by the same ratio. The static form holds while
        its dropped scores stay at or below MASKED_OUT; a ratio that is not positive and finite
        (a mask no longer dropping, or a scale of inf) leaves the call to eager's math in PyTorch."""
        values = [float(factor) for factor in factors]
        if values == self._scale_values:
            return
        self._scale_values = values
        scale, compiled_values, static_form, tensor_form = self._compiled
        ratios = [_ratio(value, compiled, exponent)
                  for value, compiled, exponent in zip(values, compiled_values, self.scale_exponents)]
        self.scale = scale * math.prod(ratios)
        mask_ratios = [math.prod(ratios[index] for index in scaling) for scaling in self.mask_scalings]
        if tensor_form is not None and mask_ratios:
            tensor_form = (replace(tensor_form, chain=tuple(map(_rescaled, tensor_form.chain, mask_ratios)))
                           if tensor_form.chain else _rescaled(tensor_form, mask_ratios[0]))
        self.tensor_form = tensor_form
        self._forms_version += 1  # plans made for the old forms are not used again
        self._static_holds = (not mask_ratios or mask_ratios[0] == 1
                              or self._static_dropped * mask_ratios[0] <= MASKED_OUT)
        usable = math.isfinite(self.scale) and all(math.isfinite(ratio) and ratio > 0 for ratio in mask_ratios)
        self._inexact_scale = None if usable else (
            "a scale read from module state, applied after a mask, is no longer positive and finite: eager's math")

    @staticmethod
    def _mask_operand(masks, form: MaskForm) -> tuple[torch.Tensor, str | None]:
        """(the one mask the kernel applies, why it would differ from eager, or None)."""
        if form.chain:
            return combined_bias(masks, form.chain)
        mask = masks[0]
        return (fresh(torch.mul, mask, form.multiplier) if form.multiplier != 1.0 else mask), None

    def _choose_form(self, masks) -> MaskForm:
        """The static form while the graph's mask is the one it was read from (one host sync), else the
        tensor form; compiled sync-free, the tensor form whenever there is one (exact without the
        check, at the cost of the static form's block skipping)."""
        if self.static_form is None:
            return self.tensor_form
        if self.tensor_form is None or (not self.sync_free and self._static_holds
                                        and torch.equal(masks[0], self._folded_mask)):
            return self.static_form
        return self.tensor_form

    @property
    def host_sync_reason(self) -> str | None:
        if self.scale_exponents:
            return "its scale is read from module state on the host (a float of each factor, per call)"
        if self.tensor_form is not None and self.tensor_form.chain:
            return "its chained masks are checked on the host for rows with no clearly visible key (combined_bias)"
        return None

    # -- layout ----------------------------------------------------------------------
    def _to_4d(self, q, k, v, masks):
        """(q, k, v, masks) as 4-d kernel operands. Masks stay broadcast views (a combined chain is
        formed at the masks' own broadcast shape); regrouped scores run in the batch dims the first
        regrouped mask was written for, so that mask needs no copy (but for more than two, merged
        into two: the kernel's (batch, heads))."""
        if self.layout.key_transposed:
            k = k.transpose(-1, -2)
        out_batch = self._out_batch(q, v)
        written_for = [batch or out_batch for batch in self.layout.mask_batches] or [out_batch] * len(masks)
        batch = next((written for written in written_for if written != out_batch), out_batch)
        if len(batch) > 2:  # Swin's (b / windows, windows, heads): the leading dims merged, the masks copied
            batch = (math.prod(batch[:-1]), batch[-1])
        if self.layout.regroup_qk:
            q, k, v = (x.reshape(*batch, *x.shape[-2:]) for x in (q, k, v))
        masks = [mask if written == batch else _regrouped_mask(mask, written, batch)
                 for mask, written in zip(masks, written_for)]
        missing = 4 - (len(batch) + 2)
        if self.tensor_form is None or not self.tensor_form.chain:
            masks = [mask.expand(torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2]))) for mask in masks]
        q, k, v = (x[(None,) * missing] for x in (q, k, v))
        return q, k, v, [mask.reshape((1,) * max(0, 4 - mask.dim()) + tuple(mask.shape)) for mask in masks]

    def _out_batch(self, q, v) -> tuple:
        """The batch dims of the graph's output: v's when the scores were regrouped, else q's."""
        return tuple((v if self.layout.regroup_qk else q).shape[:-2])

    def _from_4d(self, out, out_batch: tuple):
        """The kernel's 4-d output in the graph's batch dims (v's)."""
        return out.reshape(*out_batch, *out.shape[-2:])

    # -- kernels ---------------------------------------------------------------------
    def spec_for(self, q, k, v, form: MaskForm, *, lse: bool = False) -> attention_codegen.AttentionSpec:
        """The spec of the kernel these 4-d operands run: a DecodeSpec for short queries, unless the
        op trains (the backward needs FlashAttention-2's lse) or drops out.

        With symbolic lengths (compile time, dynamic shapes) the choice waits for run time:
        comparing them here would make Dynamo guard on the comparison."""
        lengths = (q.shape[-2], k.shape[-2])
        decode = (not self.differentiable and not self.dropout_p and all(isinstance(n, int) for n in lengths)
                  and uses_decode_kernel(*lengths))
        spec_type = decode_codegen.DecodeSpec if decode else attention_codegen.AttentionSpec
        flags = {} if decode else {"lse": lse, "dropout": bool(self.dropout_p)}
        return spec_type(
            head_dim=q.shape[-1],
            value_dim=v.shape[-1],
            mask=form.kind,
            mask_keep_when=form.keep_when,
            causal=form.causal is not None,
            empty_rows_zero=form.empty_rows_zero,
            softcap=self.softcap is not None,
            **flags,
        )

    def kernel_for(self, spec) -> tuple[object, Kernel]:
        if isinstance(spec, decode_codegen.DecodeSpec):
            return self.load_kernel(spec, decode_codegen.kernel_name, decode_codegen.render_decode)
        if isinstance(spec, backward_codegen.AttentionBackwardSpec):
            return self.load_kernel(spec, backward_codegen.kernel_name, backward_codegen.render_backward)
        return self.load_kernel(spec, attention_codegen.kernel_name, attention_codegen.render_attention)

    def prepare(self, q, k, v) -> None:
        """Generate (render, store, load) the kernels this op will launch for these shapes."""
        q, k, v, _ = self._to_4d(q, k, v, [])
        for form in (self.static_form, self.tensor_form):
            if form is not None:
                self.kernel_for(self.spec_for(q, k, v, form))

    def _causal_offset(self, q, k, form: MaskForm) -> int:
        return k.shape[-2] - q.shape[-2] if form.causal == "bottom_right" else 0

    def _settings(self, call: AttentionCall) -> dict:
        """The launch options every kernel of this call takes (forward and backward) but its tensors:
        the same for every call of one plan (the forms and the scale are keys of it)."""
        dropout = dict(dropout_p=self.dropout_p) if self.dropout_p else {}
        return dict(scale=self.scale, fill_value=call.form.fill_value,
                    causal_offset=self._causal_offset(call.q, call.k, call.form), softcap=self.softcap, **dropout)

    def _tensor_options(self, call: AttentionCall, seed: torch.Tensor | None) -> dict:
        """The launch options every kernel of this call takes that are tensors: its mask, its dropout seed."""
        return dict(mask=call.mask, **({"seed": seed} if self.dropout_p else {}))

    def _options(self, call: AttentionCall, seed: torch.Tensor | None) -> dict:
        """The launch options every kernel of this call takes: `_settings` and `_tensor_options`."""
        return self._settings(call) | self._tensor_options(call, seed)

    def _launch_plan(self, call: AttentionCall, saving: bool) -> _Launch:
        spec = self.spec_for(call.q, call.k, call.v, call.form, lse=saving)
        return _Launch(*self.kernel_for(spec), spec=spec, out_shape=(*call.q.shape[:-1], call.v.shape[-1]))

    def _launch(self, call: AttentionCall, launch: _Launch, lse: torch.Tensor | None = None,
                seed: torch.Tensor | None = None):
        q, k, v = call.q, call.k, call.v
        out = torch.empty(launch.out_shape, dtype=self.layout.out_dtype, device=q.device)
        if launch.settings is None:
            launch.settings = self._settings(call)
        tensors = self._tensor_options(call, seed) | ({"lse": lse} if lse is not None else {})

        def run(launcher):
            return launcher(q, k, v, out, **tensors, **launch.settings)

        return self.run_planned(launch, lambda: self._tuning(launch.spec, q, k), q, run)

    @staticmethod
    def _tuning(spec, q, k):
        """(lengths keying the tuned config, default config, candidate configs) for `spec`'s kernel.

        The decode kernel's config holds a split count, so its key adds the packed rows per kv
        head and the number of (batch, kv head) pairs to the lengths."""
        q_len, kv_len = q.shape[-2], k.shape[-2]
        if isinstance(spec, decode_codegen.DecodeSpec):
            shape = dict(group=q.shape[1] // k.shape[1], kv_rows=q.shape[0] * k.shape[1],
                         sm_count=decode_codegen.sm_count(q.device))
            return ((shape["group"] * q_len, kv_len, shape["kv_rows"]),
                    lambda: decode_codegen.default_config(spec, q_len, kv_len, itemsize=q.element_size(), **shape),
                    lambda: decode_codegen.config_space(spec, q_len, kv_len, **shape))
        codegen = backward_codegen if isinstance(spec, backward_codegen.AttentionBackwardSpec) else attention_codegen
        return ((q_len, kv_len),
                lambda: codegen.default_config(spec, q_len, kv_len, itemsize=q.element_size()),
                lambda: codegen.config_space(spec))

    # -- backward --------------------------------------------------------------------
    def backward(self, operands, outputs, residuals, grads):
        """The gradients (_backward), under the interpreter's launch lock as the forward is."""
        with launch_lock():
            return self._backward(operands, outputs, residuals, grads)

    def _backward(self, operands, outputs, residuals, grads):
        """dq, dk, dv from the backward kernels, the gradient of a mask that requires grad (a learned
        bias: the dq kernel stores the scores' gradient, which autograd carries back through the mask's
        broadcast, scaling and combination), zeros for the other floating-point operands; or the
        reference recomputed under autograd when the forward fell back."""
        operands = [t.detach() for t in operands]
        mask_leaves = self._mask_leaves(operands)
        with _autograd_on():
            call = self._call([mask_leaves.get(index, t) for index, t in enumerate(operands)])
        seed = residuals[1] if self.dropout_p and residuals else None
        reason = call.reason or (None if residuals else "the op was compiled for inference, without the forward's lse")
        if reason is not None:
            return self._recomputed(operands, grads, reason, seed)
        graph_mask = call.mask
        call.mask = None if graph_mask is None else graph_mask.detach()
        dmask = None
        if graph_mask is not None and graph_mask.requires_grad:
            dmask = torch.zeros(graph_mask.shape, dtype=torch.float32, device=graph_mask.device)
        out = outputs[0].reshape(*call.q.shape[:-1], call.v.shape[-1])
        dq, dk, dv = self._attention_grads(call, out, grads[0].reshape(out.shape), residuals[0], seed, dmask)
        mask_grads = {}
        if dmask is not None:
            found = torch.autograd.grad(graph_mask, list(mask_leaves.values()), dmask.to(graph_mask.dtype),
                                        allow_unused=True)
            mask_grads = dict(zip(mask_leaves, found))
        return self._operand_grads(operands, dq, dk, dv, mask_grads)

    def _mask_leaves(self, operands) -> dict[int, torch.Tensor]:
        """{operand index: a leaf requiring grad} for the floating-point masks, when one requires grad."""
        if not self.masks_require_grad:
            return {}
        masks, _ = self._split_rest(operands[3:])
        return {3 + index: mask.requires_grad_() for index, mask in enumerate(masks) if mask.is_floating_point()}

    def _recomputed(self, operands, grads, reason: str, seed: torch.Tensor | None):
        """recomputed_backward, replaying the forward's dropout seed."""
        token = _replayed_seed.set(seed)
        try:
            return self.recomputed_backward(operands, grads, f"backward: recomputed in PyTorch ({reason})")
        finally:
            _replayed_seed.reset(token)

    def _attention_grads(self, call: AttentionCall, out, dout, lse, seed, dmask=None):
        """(dq, dk, dv) of the 4-d operands: the dq kernel (it also writes delta, and the mask's gradient
        into `dmask` when given), then the dkdv kernel."""
        q, k, v = call.q, call.k, call.v
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        delta = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        forward_spec = self.spec_for(q, k, v, call.form)
        options = self._options(call, seed)
        launches = {
            "dq": lambda module, config: module.launch(q, k, v, out, dout, lse, delta, dq, config=config, **options,
                                                       **({"dmask": dmask} if dmask is not None else {})),
            "dkdv": lambda module, config: module.launch(q, k, v, dout, lse, delta, dk, dv, config=config, **options),
        }
        for part, launch in launches.items():
            mask_grad = part == "dq" and dmask is not None
            spec = backward_codegen.AttentionBackwardSpec(forward_spec, part, mask_grad=mask_grad)
            module, kernel = self.kernel_for(spec)
            lengths, default, candidates = self._tuning(spec, q, k)
            run = lambda config, module=module, launch=launch: launch(module, config)  # noqa: E731
            run(self.tuned_config(kernel, lengths, q, default=default, candidates=candidates, run=run))
        return dq, dk, dv

    def _operand_grads(self, operands, dq, dk, dv, mask_grads: dict) -> list[torch.Tensor]:
        """The 4-d gradients in the graph operands' layouts (as torch.empty_like gives them), the masks'
        ({operand index: gradient}), zeros for the other floating-point operands (scale factors)."""
        q, k, v = operands[:3]
        if self.layout.key_transposed:
            dk = dk.reshape(k.transpose(-1, -2).shape).transpose(-1, -2)
        found = [dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)]
        found += [mask_grads.get(index) for index in range(3, len(operands))]
        return [grad_like(operand, grad) for operand, grad in zip(operands, found) if operand.is_floating_point()]

    # -- references ------------------------------------------------------------------
    def _reference_of(self, call: AttentionCall, seed: torch.Tensor | None):
        """Eager's math for the call (dropout's keep mask drawn from `seed`, so the backward's recompute
        drops the same weights)."""
        keep = None
        if seed is not None:
            generator = torch.Generator(device=call.q.device).manual_seed(int(seed.item()))
            shape = (*call.q.shape[:-1], call.k.shape[-2])
            keep = torch.rand(shape, generator=generator, device=call.q.device) >= self.dropout_p
        if call.form.chain:
            return self._chain_reference(call.q, call.k, call.v, call.masks, keep)
        return self._reference(call.q, call.k, call.v, call.mask, call.form, keep)

    def _dropped(self, weights: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return weights if keep is None else weights * keep / (1 - self.dropout_p)

    def _chain_reference(self, q, k, v, masks, keep=None):
        """Eager's math for masks applied in turn: a bool mask replaces scores by its fill, an
        additive one adds to them (scaled by what follows it)."""
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = attention_codegen.capped_scores(q, k, self.scale, self.softcap)
        for mask, form in zip(masks, self.tensor_form.chain):
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask != form.keep_when, form.fill_value)
            else:
                scores = scores + mask.to(scores.dtype) * form.multiplier
        weights = self._dropped(scores.softmax(dim=-1), keep)
        return torch.matmul(weights.to(v.dtype), v).to(self.layout.out_dtype)

    def _reference(self, q, k, v, mask, form, keep=None):
        out = attention_codegen.attention_reference(
            q, k, v,
            scale=self.scale,
            mask=mask,
            mask_keep_when=form.keep_when,
            fill_value=form.fill_value,
            causal=form.causal is not None,
            causal_offset=self._causal_offset(q, k, form),
            empty_rows_zero=form.empty_rows_zero,
            softcap=self.softcap,
            dropout_p=self.dropout_p if keep is not None else 0.0,
            dropout_keep=keep,
        )
        return out.to(self.layout.out_dtype)


class MultiheadAttentionOp(AttentionOp):
    """F.multi_head_attention_forward (nn.MultiheadAttention) without bias_k/bias_v, static keys or
    zero attention: the projections run in PyTorch as eager writes them, the attention (and its
    dropout in training) in the generated kernel, on the same mask eager merges from
    key_padding_mask and attn_mask."""

    saves_outputs = False  # the backward reads the attention's output, saved among the residuals

    def __init__(self, replaced, layout: MultiheadLayout, head_dim: int, out_dtype: torch.dtype,
                 static_form: MaskForm | None, tensor_form: MaskForm | None, mode: str = "default",
                 dropout_p: float = 0.0, masks_require_grad: bool = False):
        super().__init__(replaced, 1.0 / math.sqrt(head_dim), AttentionLayout(out_dtype=out_dtype),
                         static_form, tensor_form, mode=mode, dropout_p=dropout_p,
                         masks_require_grad=masks_require_grad)
        self.heads = layout

    library_op = "multihead_attention"
    fast_path = FusedOp.fast_path  # the projections around the attention run in PyTorch

    def graph_output(self):
        """forward returns the output; the graph, (output, None)."""
        return library.saved_with_no_weights if self.differentiable else library.with_no_weights

    def output_like(self, *tensors):
        operands = dict(zip(self.heads.roles, tensors))
        query, weight = operands["query"], operands["out_proj_weight"]
        return torch.empty((*query.shape[:-1], weight.shape[0]), dtype=query.dtype, device=query.device)

    def forward(self, *tensors):
        return self._multihead(tensors)[0]

    def forward_saving(self, *tensors):
        """The output and, for training, the attention's output (batch, heads, tgt_len, head_dim), then
        AttentionOp's residuals."""
        if not self.differentiable:
            return self.forward(*tensors), []
        return self._multihead(tensors, saving=True)

    def residuals_like(self, *tensors):
        if not self.differentiable:
            return []
        query = dict(zip(self.heads.roles, tensors))["query"]
        batch, heads = (query.shape[1] if query.dim() == 3 else 1), self.heads.num_heads
        core = torch.empty((batch, heads, query.shape[0], query.shape[-1] // heads), dtype=self.layout.out_dtype,
                           device=query.device)
        return [core, *self._residuals(core.shape, query.device)]

    def _multihead(self, tensors, saving: bool = False):
        operands, batched = self._operands(tensors)
        q, k, v, masks = self._attention_inputs(operands)
        core, residuals = self._attend([q, k, v, *masks], saving)
        return self._out_projection(core, operands, batched), ([core, *residuals] if saving else [])

    def _backward(self, operands, outputs, residuals, grads):
        """The projections recomputed and differentiated by PyTorch around the attention, whose
        backward runs the kernels from the saved output and lse (_AttentionCore)."""
        core, lse, seed = (residuals + [None] * 3)[:3]
        leaves = _unique_leaves(operands)
        with _autograd_on():
            named, batched = self._operands(leaves)
            q, k, v, masks = self._attention_inputs(named)
        call = self._call([q.detach(), k.detach(), v.detach(), *(mask.detach() for mask in masks)])
        reason = call.reason or (None if residuals else "the op was compiled for inference, without the forward's lse")
        reason = reason or ("a mask requires grad" if self.masks_require_grad else None)
        if reason is not None:
            return self._recomputed(operands, grads, reason, seed)
        with _autograd_on():
            attended = _AttentionCore.apply(lambda dout: self._attention_grads(call, core, dout, lse, seed),
                                            core, q, k, v)
            out = self._out_projection(attended, named, batched)
        return _grads_of_leaves(out, grads[0], operands, leaves)

    def _operands(self, tensors) -> tuple[dict, bool]:
        """({role: tensor}, batched), unbatched inputs made a batch of one."""
        operands = dict(zip(self.heads.roles, tensors))
        batched = operands["query"].dim() == 3
        if not batched:
            operands = {role: self._batched(role, tensor) for role, tensor in operands.items()}
        return operands, batched

    def _attention_inputs(self, operands):
        """(q, k, v, masks) of the attention: projected, split into heads, masks merged."""
        q, k, v = self._projections(operands)
        masks = [] if self.tensor_form is None else [self._merged_mask(operands, q.shape[0], q.shape[2], k.shape[2])]
        return q, k, v, masks

    @staticmethod
    def _out_projection(core, operands, batched: bool):
        tgt_len, bsz, embed_dim = operands["query"].shape
        out = core.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, operands["out_proj_weight"], operands.get("out_proj_bias")).view(tgt_len, bsz, -1)
        return out if batched else out.squeeze(1)

    @staticmethod
    def _batched(role: str, tensor: torch.Tensor) -> torch.Tensor:
        """Unbatched inputs as eager treats them: a batch of one (dim 1 of (L, E) tensors, dim 0 of masks)."""
        if role in ("query", "key", "value"):
            return tensor.unsqueeze(1)
        return tensor.unsqueeze(0) if role == "key_padding_mask" else tensor

    def _projections(self, operands):
        """q, k, v as (batch, heads, length, head_dim), projected as eager's _in_projection(_packed)."""
        query, key, value = operands["query"], operands["key"], operands["value"]
        embed_dim = query.shape[-1]
        bias = operands.get("in_proj_bias")
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        if "in_proj_weight" not in operands:
            weights = (operands["q_proj_weight"], operands["k_proj_weight"], operands["v_proj_weight"])
            projected = [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]
        elif query is key is value:
            packed = F.linear(query, operands["in_proj_weight"], bias).unflatten(-1, (3, embed_dim))
            projected = packed.unbind(-2)
        else:
            weights = operands["in_proj_weight"].chunk(3)
            projected = [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]
        heads = self.heads.num_heads
        return [x.reshape(x.shape[0], x.shape[1] * heads, -1).transpose(0, 1)
                .view(x.shape[1], heads, x.shape[0], -1) for x in projected]

    def _merged_mask(self, operands, batch: int, tgt_len: int, src_len: int) -> torch.Tensor:
        """key_padding_mask and attn_mask merged into one additive (batch, heads or 1, tgt_len, src_len)
        mask, bool masks as -inf where True, as F.multi_head_attention_forward does."""
        dtype = operands["query"].dtype
        merged = None
        attn_mask = operands.get("attn_mask")
        if attn_mask is not None:
            merged = _additive(attn_mask, dtype)
            merged = merged.view(batch, -1, tgt_len, src_len) if merged.dim() == 3 else merged
        padding = operands.get("key_padding_mask")
        if padding is not None:
            padding = _additive(padding, dtype).view(batch, 1, 1, src_len)
            merged = padding if merged is None else merged + padding
        return merged


def _unique_leaves(operands) -> list[torch.Tensor]:
    """A leaf that requires grad for each floating-point operand, one per distinct tensor (self-attention
    passes one tensor as query, key and value: eager's packed projection checks `query is key`)."""
    leaves: dict[int, torch.Tensor] = {}
    return [leaves.setdefault(id(t), t.detach().requires_grad_()) if t.is_floating_point() else t for t in operands]


def _grads_of_leaves(out: torch.Tensor, dout: torch.Tensor, operands, leaves) -> list[torch.Tensor]:
    """The gradient of each floating-point operand: its leaf's at the leaf's first operand, zeros at the
    others (autograd adds up what each position gets)."""
    distinct = list({id(leaf): leaf for leaf in leaves if leaf.is_floating_point()}.values())
    found = dict(zip(map(id, distinct), torch.autograd.grad(out, distinct, dout, allow_unused=True)))
    grads = [found.pop(id(leaf), None) for leaf in leaves if leaf.is_floating_point()]
    return [grad_like(operand, grad) for operand, grad in zip([t for t in operands if t.is_floating_point()], grads)]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


class EncoderLayerOp(MultiheadAttentionOp):
    """nn.TransformerEncoderLayer's inference fast path (torch._transformer_encoder_layer_fwd, batch
    first): the layer norms and the feed-forward block in PyTorch, the self-attention as
    MultiheadAttentionOp with the mask as the native op reads it."""

    def __init__(self, replaced, layer: EncoderLayout, head_dim: int, out_dtype: torch.dtype,
                 static_form: MaskForm | None, tensor_form: MaskForm | None, mode: str = "default"):
        mask_role = {1: ("key_padding_mask",), 2: ("attn_mask",)}.get(layer.mask_type, ())
        roles = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")
        super().__init__(replaced, MultiheadLayout(roles + mask_role, layer.num_heads, need_weights=False), head_dim,
                         out_dtype, static_form, tensor_form, mode=mode)
        self.layer = layer

    library_op = "transformer_encoder_layer"
    graph_output = FusedOp.graph_output  # the node returns the output alone
    # PyTorch takes the fast path only without autograd: no residuals, and a backward (opcheck's)
    # recomputes the layer in PyTorch
    forward_saving, residuals_like, backward = FusedOp.forward_saving, FusedOp.residuals_like, FusedOp.backward

    def output_like(self, *tensors):
        src = dict(zip(self.layer.roles, tensors))["src"]
        return torch.empty_like(src, memory_format=torch.contiguous_format)

    def forward(self, *tensors):
        operands = dict(zip(self.layer.roles, tensors))
        x = operands["src"]
        if self.layer.norm_first:
            x = x + self._self_attention(self._norm(x, operands, 1), operands)
            return x + self._feed_forward(self._norm(x, operands, 2), operands)
        x = self._norm(x + self._self_attention(x, operands), operands, 1)
        return self._norm(x + self._feed_forward(x, operands), operands, 2)

    def _self_attention(self, x, operands):
        x = x.transpose(0, 1)
        weights = [operands[role] for role in ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")]
        masks = [operands["mask"]] if "mask" in operands else []
        out = super().forward(x, x, x, *weights, *masks)
        return out.transpose(0, 1)

    def _norm(self, x, operands, index: int):
        return F.layer_norm(x, x.shape[-1:], operands[f"norm{index}_weight"], operands[f"norm{index}_bias"],
                            self.layer.eps)

    def _feed_forward(self, x, operands):
        hidden = F.linear(x, operands["linear1_weight"], operands["linear1_bias"])
        hidden = F.gelu(hidden) if self.layer.use_gelu else F.relu(hidden)
        return F.linear(hidden, operands["linear2_weight"], operands["linear2_bias"])

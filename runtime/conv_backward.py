"""Backward of the fused long- and short-convolution ops (mixed into runtime.long_conv's LongConvOp and
ShortConvOp): launch the generated backward kernels, or fall back to PyTorch.

Neither op saves anything but its operands (runtime.library saves those): the long convolution
recomputes its filter's spectrum (one FFT per channel) and, under a post gate, the convolution
itself inside the backward kernel; the short one recomputes its pre-activation.

Long convolution. The op views its operands as (B, H, L) rows (runtime.long_conv); the backward
repeats those views under autograd, so that one autograd.grad maps the rows' gradients back onto
the operands whatever the views were (time moved last, broadcast gates and D summed, skip scale):

    rows      = op.rows_of(time-last views of the operands)        recorded by autograd
    row grads = codegen.long_conv_backward's kernel on the rows    du, dpre, dpost, and d K
    dk, dD    = autograd.grad(op.filter_spectrum(k), k, d K), Parseval's sum of d K
    grads     = autograd.grad(rows, operands, row grads)

The filter's gradient leaves as dk (H, Lk); a filter computed per call from parameters (Hyena's
implicit filter, S4D's kernel) passes it on to them through autograd of the graph around the op.
A call the kernel cannot take (its reason counted for report(), prefixed "backward: ") gets the
gradients of long_conv_reference instead. Launches hold runtime.interpret's launch lock, as the
forward's do.
"""
from __future__ import annotations

import torch

from codegen import long_conv as long_conv_codegen
from codegen import long_conv_backward
from codegen import short_conv as short_conv_codegen
from codegen import short_conv_backward
from runtime.dispatch import _autograd_on, grad_like
from runtime.interpret import launch_lock

ROW_NAMES = ("u", "k", "D", "pre_gate", "post_gate")  # runtime.long_conv.Rows' fields


def time_last(tensor: torch.Tensor, time: int) -> torch.Tensor:
    """A view of `tensor` with dim `time` (from the end) last, leading 1s added where it has fewer dims."""
    while tensor.dim() < -time:
        tensor = tensor.unsqueeze(0)
    return tensor.movedim(time, -1)


def _load_backward(op, spec, name, render):
    """op.load_kernel for the backward kernel of the forward's `spec` (a key of its own in op's cache)."""
    return op.load_kernel(("backward", spec), lambda key: name(key[1]), lambda key: render(key[1]))


def _backward_reason(op, tensors: list[torch.Tensor]) -> str | None:
    """Why the backward kernel cannot take these tensors (the forward's shared reasons), or None."""
    with torch.no_grad():
        return op.why_not_kernel([t.detach() for t in tensors])


class LongConvBackward:
    """LongConvOp's backward (see the module docstring)."""

    def backward(self, operands, outputs, residuals, grads):
        (grad,) = grads
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in operands]
        floating = [t for t in leaves if t.requires_grad]
        with _autograd_on():
            rows = self._rows_of(leaves)
            row_grads = self._row_gradients(rows, self._time_last(grad).reshape(rows.u.shape))
            names = [name for name in ROW_NAMES if getattr(rows, name) is not None]
            found = torch.autograd.grad([getattr(rows, name) for name in names], floating,
                                        [row_grads[name] for name in names], allow_unused=True)
        return [grad_like(leaf, grad) for grad, leaf in zip(found, floating)]

    def _time_last(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.layout.time == -1 else time_last(tensor, self.layout.time)

    def _rows_of(self, operands: list[torch.Tensor]):
        """The forward's Rows of these operands."""
        return self.rows_of(*[self._time_last(t) for t in operands])

    def _row_gradients(self, rows, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """d loss / d each of the rows' tensors, by Rows field name, from the kernel or the reference."""
        tensors = {name: getattr(rows, name) for name in ROW_NAMES}
        tensors = {name: None if t is None else t.detach() for name, t in tensors.items()}
        reason = _backward_reason(self, [t for t in tensors.values() if t is not None] + [grad]) or \
            long_conv_codegen.unsupported_reason(*tensors.values(), out=grad, circular=self.circular)
        if reason is not None:
            self.fell_back(f"backward: {reason}")
            u, k = tensors.pop("u"), tensors.pop("k")
            return long_conv_backward.long_conv_backward_reference(u, k, grad, scale=self.scale, **tensors)
        k = tensors["k"].requires_grad_()
        k_f = self.filter_spectrum(k, grad.shape[-1])  # under autograd: dk is its backward
        with torch.no_grad(), launch_lock():
            found, dk_f = self._launch_backward(grad, k_f.detach(), **tensors)
        dk, dD = long_conv_backward.spectrum_grads(k, k_f, dk_f)
        found.update(k=dk.to(k.dtype), D=None if tensors["D"] is None else dD.to(tensors["D"].dtype))
        return found

    def _launch_backward(self, grad, k_f, u, k, D, pre_gate, post_gate):
        """(du, dpre and dpost by Rows field name, the kernel's partial spectra dk_f)."""
        module, kernel = _load_backward(self, self.spec, long_conv_backward.kernel_name,
                                        long_conv_backward.render_long_conv_backward)
        seqlen = u.shape[-1]
        plan = long_conv_codegen.plan_of(k_f, seqlen)
        dk_f = long_conv_backward.spectrum_grad_buffer(long_conv_backward.batch_splits(*u.shape[:2]), k_f)
        found = dict(u=torch.empty_like(u), pre_gate=_empty_like(pre_gate), post_gate=_empty_like(post_gate))

        def run(config):
            return module.launch(u, k_f, grad, found["u"], dk_f, D=D, pre_gate=pre_gate, post_gate=post_gate,
                                 dpre=found["pre_gate"], dpost=found["post_gate"], config=config,
                                 dot_precision=long_conv_backward.dot_precision(u.dtype, k.dtype))

        config = self.tuned_config(
            kernel, (seqlen,), u,
            default=lambda: long_conv_codegen.default_config(plan),
            candidates=lambda: long_conv_codegen.config_space(plan),
            run=run,
        )
        run(config)
        return found, dk_f


def _empty_like(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else torch.empty_like(tensor)


class ShortConvBackward:
    """ShortConvOp's backward: dx, dw and db from codegen.short_conv_backward's kernel, the
    activation's derivative fused; short_conv_backward_reference where the kernel cannot run."""

    def backward(self, operands, outputs, residuals, grads):
        x, weight, *bias = operands
        (grad,) = grads
        bias = bias[0] if bias else None
        rows = dict(x=x.detach(), weight=weight.detach().reshape(weight.shape[0], weight.shape[-1]),
                    bias=None if bias is None else bias.detach())
        reason = _backward_reason(self, [t for t in rows.values() if t is not None] + [grad]) or \
            short_conv_codegen.unsupported_reason(*rows.values(), grad, self.activation)
        if reason is None:
            with torch.no_grad(), launch_lock():
                found = self._launch_backward(grad, **rows)
        else:
            self.fell_back(f"backward: {reason}")
            x, weight_rows = rows.pop("x"), rows.pop("weight")
            with _autograd_on():
                found = short_conv_backward.short_conv_backward_reference(x, weight_rows, grad,
                                                                          activation=self.activation, **rows)
        found["weight"] = found["weight"].reshape(weight.shape)
        return [grad_like(leaf, found[name].to(leaf.dtype)) for name, leaf in zip(("x", "weight", "bias"), operands)]

    def _launch_backward(self, grad, x, weight, bias) -> dict[str, torch.Tensor]:
        spec = self.spec_for(weight.shape[1])
        module, kernel = _load_backward(self, spec, short_conv_backward.kernel_name,
                                        short_conv_backward.render_short_conv_backward)
        dx = torch.empty_like(x)

        def run(config):
            return module.launch(x, weight, grad, dx, bias=bias, activation=self.activation, config=config)

        config = self.tuned_config(
            kernel, tuple(x.shape[1:]), x,
            default=lambda: short_conv_codegen.default_config(x),
            candidates=short_conv_codegen.config_space,
            run=run,
        )
        _, dw, db = run(config)
        return dict(x=dx, weight=dw, bias=db)

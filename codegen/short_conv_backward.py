"""Backward of the short depthwise causal convolution: rendering and the PyTorch reference.

For out = act(acc), acc[h, t] = bias[h] + sum_j w[h, j] x[h, t - K + 1 + j] (codegen.short_conv),
and g = d loss / d out:

    ga = g * act'(acc)                              acc recomputed from x, w, bias: nothing saved
    dx[h, t] = sum_j w[h, j] ga[h, t + K - 1 - j]   the correlation: the convolution's adjoint
    dw[h, j] = sum_{b, t} ga[h, t] x[h, t - K + 1 + j]
    db[h]    = sum_{b, t} ga[h, t]

One Triton kernel per ShortConvSpec (codegen/templates/short_conv_backward.py.jinja) writes dx
and, per (batch row, time tile), partial sums of dw and db that its launcher adds up (no
atomics: the sums are deterministic). It takes the forward's launch configurations.
"""
from __future__ import annotations

import inspect

import torch

from codegen.render import render
from codegen.short_conv import ShortConvSpec, short_conv_reference
from codegen.short_conv import kernel_name as forward_kernel_name


def kernel_name(spec: ShortConvSpec) -> str:
    """e.g. short_conv_backward_k4, short_conv_backward_k3_bias_silu."""
    return forward_kernel_name(spec).replace("short_conv", "short_conv_backward", 1)


def render_short_conv_backward(spec: ShortConvSpec) -> str:
    """Python source of a module holding the backward kernel for `spec` and its `launch`."""
    return render("short_conv_backward.py.jinja", name=kernel_name(spec), spec=spec,
                  shapes_doc=inspect.getdoc(short_conv_backward_reference))


def short_conv_backward_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> dict[str, torch.Tensor]:
    """The gradients of short_conv_reference's operands for the output gradient `grad`, by name
    (x, weight, and bias where given), each in its operand's dtype.

    short_conv_backward_reference differentiates short_conv_reference with autograd; launch runs
    the backward kernel of one ShortConvSpec into dx and returns (dx, dw, db) with dw, db in fp32.

        x, grad, dx  (batch, channels, L)    any strides; dx preallocated, any float dtype
        weight       (channels, K), K 2..8   dw: (channels, K)
        bias         (channels,), or None    db: (channels,), or None
    """
    operands = dict(x=x, weight=weight, bias=bias)
    leaves = {name: t.detach().requires_grad_() for name, t in operands.items() if t is not None}
    with torch.enable_grad():
        out = short_conv_reference(leaves["x"], leaves["weight"], bias=leaves.get("bias"), activation=activation)
        found = torch.autograd.grad(out, list(leaves.values()), grad.to(out.dtype))
    return dict(zip(leaves, found))

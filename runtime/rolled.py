"""The rolled selective scan: one custom op standing for a whole scan function (compiler.register_rolled).

    torch.ops.flashfx.rolled_selective_scan(key, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        -> (out, last state) of FUNCTIONS[key](u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)

The fake implementation runs the function on the first time step only, so capture costs the same at
every L and output dtypes are the function's own; the real one runs the function, so a call flashfx
does not fuse (or another torch.compile backend) still computes it; the backward recomputes it under
autograd, in one opaque op too. The ssm_scan pass replaces the op by the fused scan.

A key is the function's name, "@", and its id in hex (`key_of`): the pass reads the name for report().
"""
from __future__ import annotations

from typing import Callable

import torch

from runtime.dispatch import _autograd_on

FUNCTIONS: dict[str, Callable] = {}

Tensor = torch.Tensor


def key_of(fn: Callable) -> str:
    return f"{fn.__name__}@{id(fn):x}"


@torch.library.custom_op("flashfx::rolled_selective_scan", mutates_args=())
def rolled_selective_scan(key: str, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                          z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """(out, last state) of the registered function `key`."""
    out, state = FUNCTIONS[key](u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    return out.clone(), state.clone()


@rolled_selective_scan.register_fake
def _(key, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    first = [None if x is None else x[..., :1] for x in (u, delta, B, C, z)]
    out, state = FUNCTIONS[key](*first[:2], A, *first[2:4], D, first[4], delta_bias, delta_softplus, True)
    return out.new_empty(out.shape[:-1] + u.shape[-1:]), torch.empty_like(state)


@torch.library.custom_op("flashfx::rolled_selective_scan_backward", mutates_args=())
def rolled_selective_scan_backward(key: str, inputs: list[Tensor | None], delta_softplus: bool, grad_out: Tensor,
                                   grad_state: Tensor) -> list[Tensor]:
    """The gradient of each tensor in `inputs` (u, delta, A, B, C, D, z, delta_bias; None where absent),
    from the registered function `key` recomputed under autograd."""
    leaves = [x.detach().requires_grad_() for x in inputs if x is not None]
    present = iter(leaves)
    with _autograd_on():
        out, state = FUNCTIONS[key](*[None if x is None else next(present) for x in inputs], delta_softplus, True)
    grads = torch.autograd.grad((out, state), leaves, (grad_out, grad_state), allow_unused=True)
    return [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]


@rolled_selective_scan_backward.register_fake
def _(key, inputs, delta_softplus, grad_out, grad_state):
    return [torch.empty_like(x) for x in inputs if x is not None]


def _save_inputs(ctx, inputs, output) -> None:
    ctx.key, *tensors, ctx.softplus = inputs
    ctx.present = [x is not None for x in tensors]
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad_out, grad_state):
    tensors = list(ctx.saved_tensors)
    grads = iter(rolled_selective_scan_backward(ctx.key, tensors, ctx.softplus, grad_out, grad_state))
    return None, *[next(grads) if present else None for present in ctx.present], None


rolled_selective_scan.register_autograd(_backward, setup_context=_save_inputs)

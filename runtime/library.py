"""flashfx's fused ops as PyTorch custom ops, in one namespace: torch.ops.flashfx.<family>.

The lowered graph holds plain call_function nodes, one per fused op:

    out = torch.ops.flashfx.attention(operands, op)     # operands: the tensors the pass wired in
                                                        # op: the key of its FusedOp in OPS

so FakeTensor shape propagation, autograd, AOTAutograd and Inductor see an ordinary op. Each op's

    implementation   OPS[op].forward_saving(*operands): the outputs of the generated kernel (or its PyTorch
                     reference, runtime.dispatch), then a list of residuals its backward needs (a row
                     log-sum-exp, chunk states), empty unless the op was captured for training
    fake             OPS[op].output_like(*operands) and OPS[op].residuals_like(*operands): empty tensors of
                     the real ones' shapes, dtypes and strides
    autograd         saves the operands, the outputs (when the op's backward reads them) and the residuals;
                     backward is torch.ops.flashfx.backward(operands, outputs, residuals, grads, op): the
                     op's backward kernels, or its PyTorch reference recomputed under autograd; it
                     returns one gradient per floating-point operand

Every schema ends in `Tensor[] residuals`, which the lowered graph drops (`visible_outputs`). The
family registry (runtime.families) defines one op per name its rows declare (`define`).

A key is random, so a graph cached by Inductor in one process never names another process's op.
OPS holds each FusedOp weakly: the compiled model's report and the lowered graph keep it alive.
"""
from __future__ import annotations

import contextlib
import uuid
import weakref

import torch

NAMESPACE = "flashfx"
OUTPUTS: dict[str, int] = {}  # custom op -> how many tensors it returns before its residuals (`define`)
BACKWARD_SCHEMA = "(Tensor[] operands, Tensor[] outputs, Tensor[] residuals, Tensor[] grads, str op) -> Tensor[]"

OPS: weakref.WeakValueDictionary[str, torch.nn.Module] = weakref.WeakValueDictionary()


def register(op: torch.nn.Module) -> str:
    """A new key for `op` (a FusedOp) in OPS."""
    key = f"{op.pattern}-{uuid.uuid4().hex[:16]}"
    OPS[key] = op
    return key


def lookup(key: str) -> torch.nn.Module:
    op = OPS.get(key)
    if op is None:
        raise RuntimeError(f"flashfx: no fused op {key!r} in this process (the model that compiled it was freed, "
                           "or the graph was saved by another process); compile the model again")
    return op


def custom_op(name: str):
    """The OpOverload torch.ops.flashfx.<name>.default."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


_recordings: list[list] = []  # open recording() blocks


@contextlib.contextmanager
def recording():
    """[(FusedOp, operands)] of every fused-op call made in the block (for tests and benchmarks)."""
    calls = []
    _recordings.append(calls)
    try:
        yield calls
    finally:
        _recordings.remove(calls)


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _run(operands: list[torch.Tensor], op: str):
    fused = lookup(op)
    for calls in _recordings:
        calls.append((fused, list(operands)))
    outputs, residuals = fused.forward_saving(*operands)
    return (*_as_tuple(outputs), residuals)


def _fake(operands: list[torch.Tensor], op: str):
    fused = lookup(op)
    return (*_as_tuple(fused.output_like(*operands)), fused.residuals_like(*operands))


def visible_outputs(result: tuple):
    """What the replaced node returned: the custom op's outputs without the residuals list."""
    outputs = result[:-1]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def with_no_weights(result: tuple) -> tuple[torch.Tensor, None]:
    """F.multi_head_attention_forward's (output, attention weights) when the weights are not asked for."""
    return result[0], None


def _save_for_backward(ctx, inputs, output) -> None:
    operands, ctx.op = inputs
    fused = lookup(ctx.op)
    outputs, residuals = list(output[:-1]), list(output[-1])
    outputs = outputs if fused.saves_outputs else []
    ctx.floating = [t.is_floating_point() for t in operands]
    ctx.counts = (len(operands), len(outputs))
    ctx.save_for_backward(*operands, *outputs, *residuals)


def _backward(ctx, *grads):
    saved = list(ctx.saved_tensors)
    operands, outputs = ctx.counts
    found = iter(torch.ops.flashfx.backward(saved[:operands], saved[operands:operands + outputs],
                                            saved[operands + outputs:], list(grads[:-1]), ctx.op))
    return [next(found) if floating else None for floating in ctx.floating], None


def _run_backward(operands: list[torch.Tensor], outputs: list[torch.Tensor], residuals: list[torch.Tensor],
                  grads: list[torch.Tensor], op: str) -> list[torch.Tensor]:
    return lookup(op).backward(operands, outputs, residuals, grads)


def _fake_backward(operands: list[torch.Tensor], outputs: list[torch.Tensor], residuals: list[torch.Tensor],
                   grads: list[torch.Tensor], op: str) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in operands if t.is_floating_point()]


def define(name: str, outputs: int) -> None:
    """torch.ops.flashfx.<name>: a fused op returning `outputs` tensors, then its residuals."""
    OUTPUTS[name] = outputs
    schema = f"(Tensor[] operands, str op) -> ({'Tensor, ' * outputs}Tensor[] residuals)"  # `op`: the FusedOp's key
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", _run, mutates_args=(), schema=schema)
    op.register_fake(_fake)
    op.register_autograd(_backward, setup_context=_save_for_backward)


def _define_backward() -> None:
    backward = torch.library.custom_op(f"{NAMESPACE}::backward", _run_backward, mutates_args=(),
                                       schema=BACKWARD_SCHEMA)
    backward.register_fake(_fake_backward)


_define_backward()

"""flashfx's fused ops as PyTorch custom ops, in one namespace: torch.ops.flashfx.<family>.

The lowered graph holds plain call_function nodes, one per fused op:

    out = torch.ops.flashfx.attention(operands, op)     # operands: the tensors the pass wired in
                                                        # op: the key of its FusedOp in OPS

so FakeTensor shape propagation, autograd, AOTAutograd and Inductor see an ordinary op. Each op's

    implementation   OPS[op](*operands): the generated kernel, or its PyTorch reference (runtime.dispatch)
    fake             OPS[op].output_like(*operands): empty outputs of the real ones' shapes, dtypes, strides
    autograd         saves the operands; backward is torch.ops.flashfx.backward(operands, grads, op), which
                     recomputes the op's PyTorch reference under autograd (no backward kernels yet) and
                     returns one gradient per floating-point operand

A key is random, so a graph cached by Inductor in one process never names another process's op.
OPS holds each FusedOp weakly: the compiled model's report and the lowered graph keep it alive.
"""
from __future__ import annotations

import contextlib
import uuid
import weakref

import torch

NAMESPACE = "flashfx"
SCHEMAS = {  # custom op -> its schema; `op` is the FusedOp's key in OPS
    "attention": "(Tensor[] operands, str op) -> Tensor",
    "multihead_attention": "(Tensor[] operands, str op) -> Tensor",
    "transformer_encoder_layer": "(Tensor[] operands, str op) -> Tensor",
    "long_conv": "(Tensor[] operands, str op) -> Tensor",
    "short_conv": "(Tensor[] operands, str op) -> Tensor",
    "sparse_mlp": "(Tensor[] operands, str op) -> Tensor",
    "ssm_scan": "(Tensor[] operands, str op) -> Tensor",
    "ssm_scan_with_state": "(Tensor[] operands, str op) -> (Tensor, Tensor)",
    "ssm_state_update": "(Tensor[] operands, str op) -> (Tensor, Tensor)",
    "ssd_scan": "(Tensor[] operands, str op) -> Tensor",
    "ssd_scan_with_state": "(Tensor[] operands, str op) -> (Tensor, Tensor)",
    "ssd_state_update": "(Tensor[] operands, str op) -> (Tensor, Tensor)",
}
BACKWARD_SCHEMA = "(Tensor[] operands, Tensor[] grads, str op) -> Tensor[]"

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


def _run(operands: list[torch.Tensor], op: str):
    fused = lookup(op)
    for calls in _recordings:
        calls.append((fused, list(operands)))
    return fused(*operands)


def _fake(operands: list[torch.Tensor], op: str):
    return lookup(op).output_like(*operands)


def with_no_weights(out: torch.Tensor) -> tuple[torch.Tensor, None]:
    """F.multi_head_attention_forward's (output, attention weights) when the weights are not asked for."""
    return out, None


def _save_operands(ctx, inputs, output) -> None:
    operands, ctx.op = inputs
    ctx.floating = [t.is_floating_point() for t in operands]
    ctx.save_for_backward(*operands)


def _backward(ctx, *grads):
    found = iter(torch.ops.flashfx.backward(list(ctx.saved_tensors), list(grads), ctx.op))
    return [next(found) if floating else None for floating in ctx.floating], None


def _run_backward(operands: list[torch.Tensor], grads: list[torch.Tensor], op: str) -> list[torch.Tensor]:
    return lookup(op).backward(operands, grads)


def _fake_backward(operands: list[torch.Tensor], grads: list[torch.Tensor], op: str) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in operands if t.is_floating_point()]


def _define() -> None:
    for name, schema in SCHEMAS.items():
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", _run, mutates_args=(), schema=schema)
        op.register_fake(_fake)
        op.register_autograd(_backward, setup_context=_save_operands)
    backward = torch.library.custom_op(f"{NAMESPACE}::backward", _run_backward, mutates_args=(),
                                       schema=BACKWARD_SCHEMA)
    backward.register_fake(_fake_backward)


_define()

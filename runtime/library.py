"""flashfx's fused ops as PyTorch custom ops, in one namespace: torch.ops.flashfx.<family>.

The lowered graph holds plain call_function nodes, one per fused op:

    out = torch.ops.flashfx.attention(operands, op)     # operands: the tensors the pass wired in
                                                        # op: the key of its FusedOp in OPS

so FakeTensor shape propagation, autograd, AOTAutograd and Inductor see an ordinary op. Each op's

    implementation   OPS[op].run_op(operands): the outputs of the generated kernel (or its PyTorch
                     reference, runtime.dispatch), as the op's forward returns them; an op captured for
                     training calls the _saving twin, which returns them as a tuple followed by a list of
                     the residuals its backward needs (a row log-sum-exp, chunk states)
    fake             OPS[op].output_like(*operands) (and OPS[op].residuals_like(*operands)): empty tensors
                     of the real ones' shapes, dtypes and strides
    autograd         saves the operands, the outputs (when the op's backward reads them) and the residuals;
                     backward is torch.ops.flashfx.backward(operands, outputs, residuals, grads, op): the
                     op's backward kernels, or its PyTorch reference recomputed under autograd; it
                     returns one gradient per floating-point operand

A _saving twin's schema ends in `Tensor[] residuals`, which the lowered graph drops
(`visible_outputs`); the op an inference graph calls returns no list, which the dispatcher would
convert on every call. The family registry (runtime.families) defines, per name its rows declare,
the op and its _saving twin (`define`), and for each of them a twin <name>_host_sync, tagged
torch.Tag.cudagraph_unsafe: an op compiled for CUDA graphs whose default path must read tensor
values on the host calls it (and its backward, backward_host_sync), so Inductor runs it between the
captured partitions.

The ops are registered through a torch.library.Library (define, impl, register_fake) rather than
torch.library.custom_op, whose every call pays for a Python autograd wrapper, a redispatch, a
TorchDynamo-disable wrapper and an aliasing check (about 9 us on a CPU, against 2 us). The
Autograd kernel (`_autograd_kernel`) runs the op at once when the call needs no gradient and its
tensors are plain CPU or CUDA ones; otherwise (a gradient to record, or FakeTensor, proxy or
functional tensors while PyTorch traces) it hands over to torch.library's own autograd wrapper,
the one custom_op installs, so training and tracing behave exactly as before.

A key is random, so a graph cached by Inductor in one process never names another process's op.
OPS holds each FusedOp weakly: the compiled model's report and the lowered graph keep it alive.
"""
from __future__ import annotations

import contextlib
import itertools
import uuid
import weakref

import torch
from torch._library.autograd import Info as AutogradInfo, make_autograd_impl

from runtime.interpret import launch_lock

NAMESPACE = "flashfx"
SAVING = "_saving"  # the suffix of each op's twin that also returns its backward's residuals (`define`)
HOST_SYNC = "_host_sync"  # the suffix of each op's twin that Inductor runs outside CUDA graphs (`define`)
OUTPUTS: dict[str, int] = {}  # custom op -> how many tensors it returns (a _saving twin: before its residuals)
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


def twin(name: str, saving: bool, host_synced: bool) -> str:
    """The name of op `name`'s twin: returning residuals (`saving`), run outside CUDA graphs (`host_synced`)."""
    return name + (SAVING if saving else "") + (HOST_SYNC if host_synced else "")


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


def as_tuple(outputs) -> tuple:
    """A forward's outputs as a tuple (one output is returned bare)."""
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _run(operands: list[torch.Tensor], op: str):
    fused = lookup(op)
    for calls in _recordings:
        calls.append((fused, list(operands)))
    with launch_lock():
        return fused.run_op(operands)


def _fake(operands: list[torch.Tensor], op: str):
    fused = lookup(op)
    outputs = fused.output_like(*operands)
    return (*as_tuple(outputs), fused.residuals_like(*operands)) if fused.differentiable else outputs


def visible_outputs(result: tuple):
    """What the replaced node returned, from a _saving op's result: its outputs without the residuals list."""
    outputs = result[:-1]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def with_no_weights(output: torch.Tensor) -> tuple[torch.Tensor, None]:
    """F.multi_head_attention_forward's (output, attention weights) when the weights are not asked for."""
    return output, None


def saved_with_no_weights(result: tuple) -> tuple[torch.Tensor, None]:
    """with_no_weights from a _saving op's result."""
    return result[0], None


def _save_for_backward(ctx, inputs, output) -> None:
    operands, ctx.op = inputs
    fused = lookup(ctx.op)
    if fused.differentiable:  # a _saving op's result
        outputs, residuals = list(output[:-1]), list(output[-1])
    else:
        outputs, residuals = list(as_tuple(output)), []
    outputs = outputs if fused.saves_outputs else []
    ctx.floating = [t.is_floating_point() for t in operands]
    ctx.counts = (len(operands), len(outputs))
    ctx.save_for_backward(*operands, *outputs, *residuals)


def _backward(ctx, *grads):
    saved = list(ctx.saved_tensors)
    operands, outputs = ctx.counts
    fused = lookup(ctx.op)
    backward = custom_op("backward" + (HOST_SYNC if fused.host_synced else ""))
    grads = grads[:-1] if fused.differentiable else grads  # (a _saving op's residuals get none)
    found = iter(backward(saved[:operands], saved[operands:operands + outputs], saved[operands + outputs:],
                          list(grads), ctx.op))
    return [next(found) if floating else None for floating in ctx.floating], None


def _run_backward(operands: list[torch.Tensor], outputs: list[torch.Tensor], residuals: list[torch.Tensor],
                  grads: list[torch.Tensor], op: str) -> list[torch.Tensor]:
    return lookup(op).backward(operands, outputs, residuals, grads)


def _fake_backward(operands: list[torch.Tensor], outputs: list[torch.Tensor], residuals: list[torch.Tensor],
                   grads: list[torch.Tensor], op: str) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in operands if t.is_floating_point()]


_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_PLAIN_BACKENDS = (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)  # nothing between autograd and the kernel


def _autograd_kernel(name: str):
    """torch.ops.flashfx.<name>'s Autograd kernel: the op itself for a plain call that records no
    gradient, else torch.library's autograd wrapper (make_autograd_impl, as custom_op registers it)."""
    op = custom_op(name)
    recorded = make_autograd_impl(op, AutogradInfo(_backward, _save_for_backward))

    def kernel(keyset, operands, key):
        if _plain(keyset) and not (torch.is_grad_enabled() and torch._C._any_requires_grad(operands)):
            return _run(operands, key)
        return recorded(keyset, operands, key)

    return kernel


_plain_keysets: dict[int, bool] = {}


def _plain(keyset) -> bool:
    """Does a call with this dispatch key set go from autograd straight to a CPU or CUDA kernel (no
    FakeTensor, proxy or functionalization key in between)? Memoised per key set."""
    raw = keyset.raw_repr()
    plain = _plain_keysets.get(raw)
    if plain is None:
        plain = _plain_keysets[raw] = (keyset & _BELOW_AUTOGRAD).highestPriorityTypeId() in _PLAIN_BACKENDS
    return plain


def define(name: str, outputs: int) -> None:
    """torch.ops.flashfx.<name>: a fused op returning `outputs` tensors; its twin <name>_saving, which
    returns them followed by its residuals (a FusedOp's `differentiable` picks it); and the twin of each
    run outside CUDA graphs, <...>_host_sync, tagged cudagraph_unsafe (its `host_synced` picks it)."""
    for saving, host_synced in itertools.product((False, True), (False, True)):
        op_name = twin(name, saving, host_synced)
        OUTPUTS[op_name] = outputs
        returns = ", ".join(["Tensor"] * outputs + ["Tensor[] residuals"] * saving)
        tags = (torch.Tag.cudagraph_unsafe,) if host_synced else ()
        _LIBRARY.define(f"{op_name}(Tensor[] operands, str op) -> ({returns})", tags=tags)  # `op`: the FusedOp's key
        _LIBRARY.impl(op_name, _run, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{op_name}", _fake, lib=_LIBRARY)
        _LIBRARY.impl(op_name, _autograd_kernel(op_name), "Autograd", with_keyset=True)


def _define_backward() -> None:
    for name, tags in (("backward", None), ("backward" + HOST_SYNC, (torch.Tag.cudagraph_unsafe,))):
        backward = torch.library.custom_op(f"{NAMESPACE}::{name}", _run_backward, mutates_args=(),
                                           schema=BACKWARD_SCHEMA, tags=tags)
        backward.register_fake(_fake_backward)


_define_backward()

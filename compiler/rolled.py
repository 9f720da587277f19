"""Rolled scans: a scan function that TorchDynamo records as one op instead of unrolling its loop.

    compiler.register_rolled(fn)       fn computes models.mamba.selective_scan_ref's function
    fn(u, delta, A, B, C, ...)         -> flashfx::rolled_selective_scan(key, u, delta, ...)  (runtime.rolled)
                                       -> the ssm_scan pass fuses it (compiler/passes/ssm_scan/rolled.py)

Unrolling makes capture cost grow with L: Dynamo traces every step (about 6 and 9 fx nodes per
step for models.mamba and Hugging Face, a few ms per step and layer for Hugging Face's Mamba on a
CPU core; benchmarks/compile_time.py). Once fn is registered, Dynamo traces a substitute for it
(`torch._dynamo.substitute_in_graph`) that calls one custom op, whose capture costs the same at
every L.

The substitute rolls a call whose B and C vary in time (time their last dim, as the op computes
it) and, when registered with `when`, where `when()` holds at capture (for the libraries'
functions that compiler.known_scans registers: flashfx is capturing, and rolling is on); any
other call runs a copy of fn, which Dynamo traces as written.
"""
from __future__ import annotations

import inspect
import types
from typing import Callable

import torch

from runtime.rolled import FUNCTIONS, key_of, rolled_selective_scan

PARAMETERS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")

Tensor = torch.Tensor


def register_rolled(fn: Callable, *, when: Callable[[], bool] | None = None,
                    algorithm_parameters: tuple[str, ...] = ()) -> Callable:
    """Keep calls to `fn` rolled under capture and fuse them into the scan kernel; returns fn.

    fn must compute models.mamba.selective_scan_ref's function, its first ten parameters being
    (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) in that order, with
    time the last dim of u, delta, z, B and C (names may differ: Hugging Face's
    mamba_selective_scan qualifies). A call that gives any other parameter a value other than its
    default is traced as written (mamba_ssm's cu_seqlens changes the function), except for
    `algorithm_parameters`, which choose only how fn computes it. Registration is for the process
    and every torch.compile backend; fn itself is unchanged in eager code. Usable as a decorator.
    `when()`, if given, is asked at capture (mark it torch._dynamo.assume_constant_result to run
    it untraced): where it is false, Dynamo traces fn as written.
    """
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"flashfx: register_rolled expects a Python function, got {type(fn).__name__}")
    key = key_of(fn)
    if key not in FUNCTIONS:
        FUNCTIONS[key] = fn
        substitute = _substitute(fn, when, frozenset(algorithm_parameters))
        torch._dynamo.substitute_in_graph(fn, skip_signature_check=True)(substitute)
    return fn


def _substitute(fn: types.FunctionType, when: Callable[[], bool] | None, free: frozenset[str]) -> Callable:
    """What Dynamo traces in place of fn: one rolled_selective_scan call, or fn as written."""
    parameters = [p for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(parameters) < len(PARAMETERS):
        raise TypeError(f"flashfx: {fn.__name__}{inspect.signature(fn)} does not take selective_scan_ref's parameters")
    names = [p.name for p in parameters]
    defaults = {p.name: p.default for p in parameters}
    others = [name for name in names[len(PARAMETERS):] if name not in free]
    as_written = _copy(fn)
    key = key_of(fn)

    def substitute(*args, **kwargs):
        arguments = {**defaults, **dict(zip(names, args)), **kwargs}
        u, delta, A, B, C, D, z, delta_bias, softplus, last_state = (
            arguments[name] for name in names[:len(PARAMETERS)])
        rollable = (_real_in_time(u, delta, A, B, C) and len(args) <= len(names)
                    and all(name in defaults for name in kwargs)
                    and all(_is_default(arguments[name], defaults[name]) for name in others))
        if not rollable or (when is not None and not when()):
            return as_written(*args, **kwargs)
        out, state = rolled_selective_scan(key, u, delta, A, B, C, D, z, delta_bias, bool(softplus))
        return (out, state) if last_state else out

    return substitute


def _real_in_time(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> bool:
    """Real floating tensors, with B and C varying in time (their last dim), as the op computes them."""
    return all(x.is_floating_point() for x in (u, delta, A, B, C)) and B.dim() >= 3 and C.dim() >= 3


def _is_default(value, default) -> bool:
    return value is default or (isinstance(value, (bool, int, float, str)) and type(value) is type(default)
                                and value == default)


def _copy(fn: types.FunctionType) -> types.FunctionType:
    """fn as another function object: the substitute replaces fn itself, so Dynamo traces a copy as written."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy

"""Run one program's source in eager and under compiler.compile, and compare what each caller sees.

    eager_model, compiled_model = build(source), build(source)     # the model built twice
    eager_inputs, compiled_inputs = inputs(shapes), inputs(shapes) # the same seeded randn, twice
    for each call (two when the model has buffers, so state written by call 1 is read by call 2):
        compare outputs, then the inputs and buffers the model may have written, tensor by tensor

Tolerance: err <= TOLERANCE * max(1, max |eager|) per tensor (NaN and +-inf where eager has them).
Where nothing fused the compiled graph runs the same torch calls, modulo canonicalisation
(x / c -> x * (1/c), einsum -> matmul, softmax written out -> softmax), so the bound is tight;
fused kernels reassociate their reductions, so a fused graph gets FlashAttention-sized slack.
"""
from __future__ import annotations

import linecache
import math
import textwrap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import compiler

NAMESPACE = {"torch": torch, "F": F, "math": math}  # what a program's source may name

UNFUSED_TOLERANCE = 1e-6
FUSED_TOLERANCE = 1e-4


@dataclass
class Result:
    """What the caller of one call sees: its outputs, and its inputs and buffers afterwards."""

    outputs: tuple
    inputs: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]


def build(source: str) -> torch.nn.Module:
    """The Model class that `source` defines (indented or not), instantiated (a fresh class each time)."""
    source = textwrap.dedent(source)
    filename = f"<fuzz program {abs(hash(source)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # readable tracebacks
    scope = dict(NAMESPACE)
    exec(compile(source, filename, "exec"), scope)
    return scope["Model"]().eval()


def make_inputs(shapes, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def call(model, inputs: list[torch.Tensor]) -> Result:
    with torch.no_grad():
        outputs = model(*inputs)
    buffers = model.model.named_buffers() if isinstance(model, compiler.CompiledModule) else model.named_buffers()
    return Result(tuple(t.clone() for t in outputs), [t.clone() for t in inputs],
                  {name: t.clone() for name, t in buffers})


def mismatch(what: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> str | None:
    """None when got matches expected; otherwise one line saying how it differs."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"{what}: {tuple(got.shape)} {got.dtype}, eager {tuple(expected.shape)} {expected.dtype}"
    g, e = got.double(), expected.double()
    for special in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(special(g), special(e)):
            return f"{what}: {special.__name__} differs from eager (at {int((special(g) != special(e)).sum())} elements)"
    finite = e.isfinite()
    if not finite.any():
        return None
    scale = max(1.0, e[finite].abs().max().item())
    error = (g - e)[finite].abs().max().item()
    if error > tolerance * scale:
        return f"{what}: max abs error {error:.3g} (allowed {tolerance * scale:.1g}; eager max |x| {scale:.3g})"
    return None


def differences(got: Result, expected: Result, tolerance: float, names: list[str]) -> list[str]:
    found = [] if len(got.outputs) == len(expected.outputs) else [
        f"{len(got.outputs)} outputs, eager {len(expected.outputs)}"]
    pairs = [(f"output {i}", g, e) for i, (g, e) in enumerate(zip(got.outputs, expected.outputs))]
    pairs += [(f"input {name} after the call", g, e) for name, g, e in zip(names, got.inputs, expected.inputs)]
    pairs += [(f"buffer self.{name} after the call", got.buffers[name], e) for name, e in expected.buffers.items()]
    found += [line for line in (mismatch(what, g, e, tolerance) for what, g, e in pairs) if line]
    return found


CALLS = 3  # per program: planned, fast path bound, fast path replayed


def check_source(source: str, input_shapes, seed: int = 0) -> compiler.CompiledModule:
    """Assert compiler.compile(Model())(*inputs) matches eager Model()(*inputs), outputs and writes, on
    CALLS calls on fresh inputs of the same shapes, each after what the ones before wrote into buffers:
    the first plans (runtime.plans), the second binds the fast paths, the third replays them
    (runtime.bound)."""
    eager_model, compiled_model = build(source), build(source)
    compiled = compiler.compile(compiled_model, strict=True)
    names = _parameter_names(source)
    for number in range(1, CALLS + 1):
        eager_inputs = make_inputs(input_shapes, seed + number - 1)
        compiled_inputs = make_inputs(input_shapes, seed + number - 1)
        expected = call(eager_model, eager_inputs)
        try:
            got = call(compiled, compiled_inputs)
        except Exception as error:
            raise AssertionError(f"compiled call {number} raised {type(error).__name__}: {error}\n"
                                 f"{_reproduction(source, input_shapes, seed)}") from error
        tolerance = FUSED_TOLERANCE if compiled.patterns else UNFUSED_TOLERANCE
        found = differences(got, expected, tolerance, names)
        assert not found, (f"call {number}: compiled differs from eager (fused: {compiled.patterns or 'nothing'})\n  "
                           + "\n  ".join(found) + "\n" + _reproduction(source, input_shapes, seed))
    return compiled


def _parameter_names(source: str) -> list[str]:
    line = next(line for line in source.splitlines() if line.strip().startswith("def forward("))
    return [name.strip() for name in line.split("(", 1)[1].split(")")[0].split(",")[1:]]


def _reproduction(source: str, input_shapes, seed: int) -> str:
    body = "\n".join(f"    {line}" if line else "" for line in source.rstrip().splitlines())
    return (f"reproduce with (tests/fuzz/test_mutation_regressions.py):\n\n"
            f"check_source('''\n{body}\n''', {[tuple(s) for s in input_shapes]!r}{'' if seed == 0 else f', {seed}'})\n")

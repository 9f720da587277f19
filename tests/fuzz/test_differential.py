"""Differential fuzzing (hypothesis): compile(model) against eager on random programs that mix
canonicalised spellings with in-place writes (tests/fuzz/generator.py). Outputs and the inputs the
program writes must match eager; programs where nothing fuses must match exactly.

    make test                    the "ci" profile: a fixed, derandomised set of examples
    make fuzz                    FLASHFX_FUZZ=long: 25,000 random examples (FLASHFX_FUZZ_EXAMPLES),
                                 about 30 minutes on one CPU core
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import compiler
from tests.fuzz.differential import CALLS
from tests.fuzz.generator import BLOCKS, FUSING, SHAPE, VALUES, WRITES, Step, build, source

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("FLASHFX_FUZZ_EXAMPLES", 25_000)), deadline=None,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("FLASHFX_FUZZ", "ci"))

KINDS = sorted(set(VALUES) | set(BLOCKS) | set(WRITES))
PLAIN = [kind for kind in KINDS if kind not in FUSING]
picks = st.tuples(*(st.integers(0, 63) for _ in range(3)))
steps = st.builds(Step, st.sampled_from(PLAIN), picks) | st.builds(Step, st.sampled_from(FUSING), picks)
programs = st.lists(steps, min_size=1, max_size=7).filter(lambda p: sum(s.kind in FUSING for s in p) <= 2)


def _inputs(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=generator) for _ in range(3)]


@given(program=programs, seed=st.integers(0, 2**16))
def test_compiled_matches_eager(program, seed):
    text = source(program)
    forward = build(program)
    torch._dynamo.reset()
    compiled = compiler.compile(_Module(forward))
    for call_seed in range(seed, seed + CALLS):  # planned, fast path bound, then replayed (check_source)
        eager_inputs, ours_inputs = _inputs(call_seed), _inputs(call_seed)
        try:
            eager = forward(*eager_inputs)
        except RuntimeError:
            assume(False)  # eager itself rejects the program (a write overlapping its own source)
        ours = compiled(*ours_inputs)
        tolerance = dict(rtol=1e-4, atol=1e-4) if compiled.patterns else dict(rtol=0, atol=0)
        for name, a, b in [*zip(range(len(eager)), ours, eager), *zip(("x0", "x1", "x2"), ours_inputs, eager_inputs)]:
            torch.testing.assert_close(a, b, equal_nan=True, **tolerance,
                                       msg=lambda m: f"{name} differs ({m})\n{text}\n{compiled.report()}")


class _Module(torch.nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.fn = forward

    def forward(self, *args):
        return self.fn(*args)

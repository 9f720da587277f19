"""Several threads calling one compiled model: every call succeeds and matches eager.

On the CPU, flashfx runs its kernels on Triton's interpreter, which is not thread-safe (it
patches triton.language while a kernel runs), so launches are serialised there
(runtime.interpret.launch_lock); compiled kernels on a GPU run concurrently.
"""
from __future__ import annotations

import threading

import pytest
import torch

import compiler
from models import gpt

THREADS = 6
CALLS_PER_THREAD = 6


def call_from_threads(compiled, args, threads: int = THREADS, calls: int = CALLS_PER_THREAD):
    """Every output and every exception of `threads` threads calling compiled(*args) `calls` times."""
    outputs, errors = [], []
    start = threading.Barrier(threads)

    def work():
        start.wait()
        for _ in range(calls):
            try:
                with torch.no_grad():
                    outputs.append(compiled(*args))
            except Exception as error:  # collected: the test reports every failure
                errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return outputs, errors


def compiled_gpt(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A tiny naive-attention GPT compiled and called once from this thread, its output, and eager's."""
    model, (ids,) = gpt.tiny_naive(batch=2, length=64)
    model = model.to(device=device, dtype=dtype).eval()
    ids = ids.to(device)
    compiled = compiler.compile(model)
    with torch.no_grad():
        return compiled, (ids,), compiled(ids), model(ids)


def assert_all_equal(outputs, expected, calls: int):
    """Every call returned, and returned exactly what the same call from one thread returns."""
    assert len(outputs) == calls
    for out in outputs:
        assert torch.equal(out, expected)


def test_threads_share_one_compiled_model_on_the_interpreter():
    compiled, args, expected, eager = compiled_gpt()
    outputs, errors = call_from_threads(compiled, args)
    assert not errors, f"{len(errors)} of {THREADS * CALLS_PER_THREAD} calls failed: {errors[0]!r}"
    assert_all_equal(outputs, expected, THREADS * CALLS_PER_THREAD)
    torch.testing.assert_close(expected, eager, atol=1e-4, rtol=1e-4)
    assert compiled.patterns == ["attention", "attention"]
    assert "ran in PyTorch" not in compiled.report()


def test_threads_make_the_first_calls_together():
    """Capture, kernel loading and the first launches from several threads at once."""
    model, (ids,) = gpt.tiny_naive(batch=1, length=32)
    compiled = compiler.compile(model)
    outputs, errors = call_from_threads(compiled, (ids,), threads=4, calls=2)
    assert not errors, f"{len(errors)} calls failed: {errors[0]!r}"
    with torch.no_grad():
        eager = model(ids)
    for out in outputs:
        torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert "attention" in compiled.patterns and "ran in PyTorch" not in compiled.report()


@pytest.mark.gpu
def test_threads_share_one_compiled_model_on_the_gpu():
    compiled, args, expected, eager = compiled_gpt("cuda", torch.float16)
    outputs, errors = call_from_threads(compiled, args, threads=8, calls=20)
    assert not errors, f"{len(errors)} calls failed: {errors[0]!r}"
    torch.cuda.synchronize()
    assert_all_equal(outputs, expected, 8 * 20)
    torch.testing.assert_close(expected, eager, atol=2e-2, rtol=2e-2)
    assert compiled.patterns == ["attention", "attention"]
    assert "ran in PyTorch" not in compiled.report()

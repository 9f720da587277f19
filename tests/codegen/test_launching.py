"""codegen.launching's persistent: tensors a cache keeps across calls are made on a helper thread."""
from __future__ import annotations

import threading

import pytest
import torch

from codegen.launching import persistent


def test_persistent_makes_on_a_helper_thread_and_returns_what_it_made():
    threads = []

    def zeros(n):
        threads.append(threading.current_thread())
        return torch.zeros(n), torch.ones(n)

    made = persistent(zeros, 5)
    assert threads[0] is not threading.current_thread()
    torch.testing.assert_close(made[1], torch.ones(5))


def test_persistent_inside_a_persistent_make_runs_inline():
    """Already off the calling thread, a nested make needs no helper of its own."""
    threads = []

    def inner():
        threads.append(threading.current_thread())
        return torch.zeros(1)

    def outer():
        threads.append(threading.current_thread())
        return persistent(inner)

    persistent(outer)
    assert threads[0] is threads[1] is not threading.current_thread()


def test_persistent_passes_a_make_error_on():
    def fails():
        raise ValueError("no table")

    with pytest.raises(ValueError, match="no table"):
        persistent(fails)
    assert persistent(torch.zeros, 2).shape == (2,)  # and the next call is served

"""codegen.launching's persistent (tensors a cache keeps across calls, made on a helper thread) and
Scratch (buffers a call's kernels use only while it runs, reused by later calls)."""
from __future__ import annotations

import threading

import pytest
import torch

from codegen.launching import Scratch, persistent


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


def test_scratch_views_are_reused_for_the_same_shapes_and_zeroed_where_asked():
    scratch = Scratch((torch.float32, True), (None, False))
    views = scratch.views(torch.device("cpu"), torch.bfloat16, (6,), (2, 3))
    sums, rows = views
    assert sums.dtype == torch.float32 and not sums.any() and rows.dtype == torch.bfloat16
    assert rows.shape == (2, 3) and rows.is_contiguous()
    assert scratch.views(torch.device("cpu"), torch.bfloat16, (6,), (2, 3)) is views  # the same views
    smaller = scratch.views(torch.device("cpu"), torch.bfloat16, (4,), (1, 3))
    assert smaller[0].data_ptr() == sums.data_ptr()  # other shapes, the same buffers
    assert scratch.views(torch.device("cpu"), torch.float32, (6,), (2, 3))[1].dtype == torch.float32  # a set per key


def test_scratch_grows_to_what_each_buffer_needs_and_keeps_only_captured_sets():
    """A replaced set goes back to the allocator, unless a CUDA graph captured it (it replays into it)."""
    scratch = Scratch((torch.float32, True), (torch.float32, False))
    cpu = torch.device("cpu")
    first = scratch.views(cpu, None, (8,), (4,))
    second = scratch.views(cpu, None, (2,), (9,))  # the second buffer grows; the first keeps its size
    assert second[1].data_ptr() != first[1].data_ptr() and not second[0].any()
    assert scratch.views(cpu, None, (8,), (9,))[0].data_ptr() == second[0].data_ptr()
    assert not getattr(scratch._local, "captured", [])
    next(iter(scratch._local.sets.values())).captured = True  # as a capture on a CUDA stream marks it
    grown = scratch.views(cpu, None, (16,), (9,))
    assert [kept[0].data_ptr() for kept in scratch._local.captured] == [second[0].data_ptr()]
    assert grown[0].data_ptr() != second[0].data_ptr()


def test_scratch_is_per_thread():
    scratch = Scratch((torch.float32, False),)
    here = scratch.views(torch.device("cpu"), None, (8,))
    there = []
    thread = threading.Thread(target=lambda: there.extend(scratch.views(torch.device("cpu"), None, (8,))))
    thread.start()
    thread.join()
    assert there[0].data_ptr() != here[0].data_ptr()

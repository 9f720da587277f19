"""runtime.bound: a bound launch replays what its launcher started, on new operands of the same
signature, and a launcher whose call it could not replay exactly is not bound."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import runtime  # noqa: F401  (chooses Triton's interpreter on a CPU machine before triton is imported)
import triton
import triton.language as tl

from codegen.launching import fresh, start
from runtime.bound import UNBOUND, Bound, FastCall, bind, direct_once_bound
from runtime.plans import View

BLOCK = 64


@triton.jit
def _scaled(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=keep) * factor, mask=keep)


@triton.jit
def _plus_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=keep) + 1.0, mask=keep)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def scaled_plus_one(x, out, *, factor):
    """out = x * factor + 1 through a fresh buffer; x's rows are read through a view of it."""
    n = x.numel()
    buffer = fresh(torch.empty, (n,), dtype=torch.float32, device=x.device)
    start(_scaled, _grid(n), x.view(-1), buffer, n, factor, BLOCK=BLOCK)
    start(_plus_one, _grid(n), buffer, out.view(-1), n, BLOCK=BLOCK)
    return out


def test_a_bound_launch_replays_on_new_operands():
    x, out = torch.randn(3, 50), torch.empty(3, 50)
    bound, result = bind(scaled_plus_one, (x, out), {"factor": 2.0})
    assert isinstance(bound, Bound) and result is out
    torch.testing.assert_close(out, x * 2 + 1)
    for _ in range(2):
        other, other_out = torch.randn(3, 50), torch.empty(3, 50)
        assert bound(other, other_out, factor=2.0) is other_out
        torch.testing.assert_close(other_out, other * 2 + 1)


def test_a_view_of_an_operand_is_taken_from_the_new_operand():
    base, out = torch.randn(4, 40), torch.empty(40)
    bound, _ = bind(lambda x, y: scaled_plus_one(x[1], y, factor=3.0), (base, out), {})
    assert isinstance(bound, Bound)
    other = torch.randn(4, 40)
    torch.testing.assert_close(bound(other, out), other[1] * 3 + 1)


def unfreshly_allocated(x, out):
    buffer = torch.empty_like(x)  # not through fresh(): a replay could not make it again
    start(_scaled, _grid(x.numel()), x, buffer, x.numel(), 1.0, BLOCK=BLOCK)
    start(_plus_one, _grid(x.numel()), buffer, out, x.numel(), BLOCK=BLOCK)
    return out


def zeroed_first(x, out):
    out.zero_()  # a write through PyTorch, which a replay would skip
    start(_plus_one, _grid(x.numel()), x, out, x.numel(), BLOCK=BLOCK)
    return out


def returns_a_count(x, out):
    start(_plus_one, _grid(x.numel()), x, out, x.numel(), BLOCK=BLOCK)
    return x.numel()


def in_a_tuple(x, out):
    fresh(lambda pair: torch.empty(()), (x, out))  # a tensor inside another argument
    start(_plus_one, _grid(x.numel()), x, out, x.numel(), BLOCK=BLOCK)
    return out


@pytest.mark.parametrize("launcher", [unfreshly_allocated, zeroed_first, returns_a_count, in_a_tuple])
def test_launchers_a_replay_could_not_repeat_are_not_bound(launcher):
    x, out = torch.randn(70), torch.empty(70)
    bound, _ = bind(launcher, (x, out), {})
    assert bound is None
    torch.testing.assert_close(out, x + 1)  # the call itself ran


def test_a_tensor_passed_as_two_operands_is_not_bound():
    x, out = torch.randn(30), torch.empty(30)
    bound, _ = bind(lambda first, second, y: scaled_plus_one(second, y, factor=1.0), (x, x, out), {})
    assert bound is None


def test_a_view_of_storage_two_operands_share_is_not_bound():
    base = torch.randn(2, 30)
    first, second, out = base[0], base[1], torch.empty(30)
    bound, _ = bind(lambda x, y, z: scaled_plus_one(base[1], z, factor=1.0), (first, second, out), {})
    assert bound is None


def test_a_bound_launch_keeps_no_recorded_tensor_alive():
    x, out = torch.randn(3, 50), torch.empty(3, 50)
    bound, _ = bind(scaled_plus_one, (x, out), {"factor": 2.0})
    recorded = [weakref.ref(x), weakref.ref(out)]
    del x, out, _
    gc.collect()
    assert isinstance(bound, Bound) and all(ref() is None for ref in recorded)


def assert_replays_plus_one(launcher):
    """launcher(x, out) computes out = x + 1: it binds, and its replay on new values agrees."""
    x, out = torch.randn(70), torch.empty(70)
    bound, _ = bind(launcher, (x, out), {})
    assert isinstance(bound, Bound)
    other = torch.randn(70)
    torch.testing.assert_close(bound(other, out), other + 1)


def test_a_cached_buffer_written_before_the_call_still_binds():
    cached = torch.empty(70)
    cached.zero_()  # written before the call: its version counter is no longer 0

    def through_cache(x, out):
        buffer = fresh(lambda: cached)
        start(_scaled, _grid(x.numel()), x, buffer, x.numel(), 1.0, BLOCK=BLOCK)
        start(_plus_one, _grid(x.numel()), buffer, out, x.numel(), BLOCK=BLOCK)
        return out

    assert_replays_plus_one(through_cache)


def test_a_cached_make_called_twice_binds_and_is_made_once_on_a_replay():
    """Two fresh calls of one cached make with the same arguments return the same tensor (the long
    conv's FFT tables, made by its spectrum and its convolution): one source, made once per replay."""
    cached, makes = torch.empty(70), []

    def cache(n):
        makes.append(n)
        return cached

    def through_cache_twice(x, out):
        start(_scaled, _grid(x.numel()), x, fresh(cache, x.numel()), x.numel(), 1.0, BLOCK=BLOCK)
        start(_plus_one, _grid(x.numel()), fresh(cache, x.numel()), out, x.numel(), BLOCK=BLOCK)
        return out

    assert_replays_plus_one(through_cache_twice)
    assert makes == [70, 70, 70]  # the recorded call's two, the replay's one


def _copied(into, source):
    into.copy_(source)
    return ()


def test_a_fresh_call_that_makes_nothing_is_replayed_in_order():
    """A copy through fresh(...) after a kernel's start: a replay copies after the kernel too."""
    def plus_one_then_copied(x, out):
        buffer = fresh(torch.empty, x.shape)
        start(_plus_one, _grid(x.numel()), x, buffer, x.numel(), BLOCK=BLOCK)
        fresh(_copied, out, buffer)
        return out

    assert_replays_plus_one(plus_one_then_copied)


def compares_first(x, out):
    if torch.equal(x, x):  # a compare a replay would skip
        start(_plus_one, _grid(x.numel()), x, out, x.numel(), BLOCK=BLOCK)
    return out


def zeroes_its_buffer(x, out):
    buffer = fresh(torch.empty, x.shape)
    buffer.zero_()  # a write a replay would skip
    start(_plus_one, _grid(x.numel()), buffer, out, x.numel(), BLOCK=BLOCK)
    return out


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("launcher, expected", [(compares_first, lambda x: x + 1),
                                                (zeroes_its_buffer, lambda x: torch.ones_like(x))])
def test_pytorch_ops_a_replay_would_skip_leave_the_call_unbound_even_in_inference_mode(launcher, expected,
                                                                                     inference):
    """A write or a compare that the call runs itself is seen by the ops it dispatches, not by version
    counters, which inference tensors do not keep."""
    with torch.inference_mode(inference):
        x, out = torch.randn(70), torch.empty(70)
        bound, _ = bind(launcher, (x, out), {})
        assert bound is None
        torch.testing.assert_close(out, expected(x))  # the call itself ran


def heads_as_rows(q, k, out, bound):
    """A fast path's shape: its views of the operands (noted through View.of), a fresh buffer, and
    a bound launch of them, then a kernel of its own."""
    rows = View((30,), (1,), 0)
    result = fresh(torch.empty, (2, 30))
    bound(rows.of(q), rows.of(k), result)
    start(_plus_one, _grid(60), result, out, 60, BLOCK=BLOCK)
    return out


def add_rows(q, k, result):
    start(_scaled, _grid(30), q, result, 30, 1.0, BLOCK=BLOCK)
    start(_scaled, _grid(30), k, result[1], 30, 2.0, BLOCK=BLOCK)
    return result


def test_a_fast_call_flattens_the_bound_launches_it_calls():
    """A FastCall records its views, fresh calls and the bound launch it calls as one Bound. Its
    operands q and k here are views of one tensor (a fused projection's), so their own views are traced
    through the noted View.of, not by storage; a replay with q and k apart gets each right."""
    qk, out = torch.randn(2, 30), torch.empty(2, 30)
    inner, _ = bind(add_rows, (qk[0], qk[1], torch.empty(2, 30)), {})
    fast = FastCall(lambda q, k, out: heads_as_rows(q, k, out, inner))
    for call in range(3):
        qk = torch.randn(2, 30)
        q, k = (qk[0], qk[1]) if call == 0 else (qk[0].clone(), qk[1].clone())
        torch.testing.assert_close(fast(q, k, out), torch.stack([q, k * 2]) + 1)
        if call == 0:
            assert isinstance(fast.bound, Bound) and len(fast.bound.steps) == 4  # a fresh call and 3 starts


def test_a_fast_call_first_called_inside_another_recording_leaves_its_steps_to_it():
    """An inner FastCall not bound yet, called while an outer one records: its kernels are the outer
    recording's steps (not hidden in a recording of its own), and it binds on a later call of its own."""
    inner = FastCall(add_rows)
    outer = FastCall(lambda q, k, out: heads_as_rows(q, k, out, inner))
    for call in range(3):
        q, k, out = torch.randn(30), torch.randn(30), torch.empty(2, 30)
        torch.testing.assert_close(outer(q, k, out), torch.stack([q, k * 2]) + 1)
        if call == 0:
            assert isinstance(outer.bound, Bound) and len(outer.bound.steps) == 4 and inner.bound is UNBOUND
    result = torch.empty(2, 30)
    assert inner(q, k, result) is result and isinstance(inner.bound, Bound)


def test_direct_once_bound_calls_the_replay_after_the_binding_call():
    """The function runs the FastCall (which binds on that call), then its replay itself: the same
    results, with no FastCall in between."""
    fast = FastCall(add_rows)
    call = direct_once_bound(fast)
    for number in range(3):
        q, k, out = torch.randn(30), torch.randn(30), torch.empty(2, 30)
        torch.testing.assert_close(call(q, k, out), torch.stack([q, k * 2]))
        if number == 0:
            assert isinstance(fast.bound, Bound)
            fast.bound = fast.function = None  # from here on, a call of the FastCall itself would fail

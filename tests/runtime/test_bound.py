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
from runtime.bound import Bound, bind

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


@pytest.mark.parametrize("launcher", [unfreshly_allocated, zeroed_first, returns_a_count])
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


def test_a_cached_buffer_written_before_the_call_still_binds():
    cached = torch.empty(70)
    cached.zero_()  # written before the call: its version counter is no longer 0

    def through_cache(x, out):
        buffer = fresh(lambda: cached)
        start(_scaled, _grid(x.numel()), x, buffer, x.numel(), 1.0, BLOCK=BLOCK)
        start(_plus_one, _grid(x.numel()), buffer, out, x.numel(), BLOCK=BLOCK)
        return out

    x, out = torch.randn(70), torch.empty(70)
    bound, _ = bind(through_cache, (x, out), {})
    assert isinstance(bound, Bound)
    other = torch.randn(70)
    torch.testing.assert_close(bound(other, out), other + 1)


def test_a_fresh_buffer_written_through_pytorch_during_the_call_is_not_bound():
    def zeroes_its_buffer(x, out):
        buffer = fresh(torch.empty, x.shape)
        buffer.zero_()  # a write a replay would skip
        start(_plus_one, _grid(x.numel()), buffer, out, x.numel(), BLOCK=BLOCK)
        return out

    x, out = torch.randn(70), torch.empty(70)
    bound, _ = bind(zeroes_its_buffer, (x, out), {})
    assert bound is None
    torch.testing.assert_close(out, torch.ones(70))

"""Per-call-signature plans: what a fused op decides from its operands' metadata, decided once.

A fused op's forward makes two kinds of decisions. Most read only metadata (shapes, strides,
dtypes, devices, whether autograd is on): the kernel views of the operands, whether the kernel
can take them, which spec and config it launches with, the outputs' shapes. Those are the same
on every call with the same signature, so each op keeps them per signature:

    key  = (signature(operands), torch.is_grad_enabled(), what else the decisions read)
    plan = plans.get(key) or plans.remember(key, build(...))   # build: the op's full logic, once
    views: View.of(operand)                                    # one as_strided per operand

(an op's latest fast path is found with `signature_check` instead, without building a key).

Decisions that read values (a mask compared with the one folded in at compile time, a bias checked
for rows with no visible key, a selection's indices) stay per call and exact.

A View is the (sizes, strides, offset) of a view relative to the tensor it views, so a repeat
call rebuilds it with one as_strided instead of the chain of reshapes, permutes and expands that
derived it; `View.between` gives IDENTITY when the view is the tensor itself, and COPIED when the
derivation copied (a reshape that cannot view), so no plan is kept for that signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from codegen.launching import fresh, viewed

try:
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # a private class: signature_check compares signatures without it
    TensorGuards = None

PLANS_PER_OP = 64  # a growing KV cache under dynamic shapes adds one signature per length: start afresh then


def signature(tensors) -> tuple:
    """What planned decisions read from tensors: shape, strides, dtype, device, requires_grad."""
    return tuple([(t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors])


def signature_check(tensors) -> Callable[[list], bool]:
    """A test that tensors have the signature of `tensors`, cheaper than comparing signature()s: the
    tensor check TorchDynamo guards its graphs with, in C++ (shape, strides, dtype, device,
    requires_grad and dispatch keys), where this torch has it."""
    count, expected = len(tensors), signature(tensors)
    try:
        guards = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                              dynamic_dims_strides=[list(t.stride()) for t in tensors])
    except Exception:  # a private class: absent (None), or taking other arguments in this torch
        return lambda candidates: signature(candidates) == expected
    return lambda candidates: len(candidates) == count and guards.check(*candidates)


@dataclass(frozen=True)
class View:
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the viewed tensor's

    @staticmethod
    def between(source: torch.Tensor, view: torch.Tensor):
        """How `view` derives from `source`: IDENTITY (the same elements in the same layout), a View,
        or COPIED (no storage in common)."""
        if view is source:
            return IDENTITY
        if view.numel() and (not source.numel()  # (an empty view is any as_strided of its size and strides)
                             or source.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()):
            return COPIED
        found = View(tuple(view.shape), view.stride(), view.storage_offset() - source.storage_offset())
        return IDENTITY if found == View(tuple(source.shape), source.stride(), 0) else found

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return viewed(tensor, tensor.as_strided(self.size, self.stride, tensor.storage_offset() + self.offset))


class _Identity:
    """The view that is the tensor itself."""

    @staticmethod
    def of(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


IDENTITY = _Identity()
COPIED = None  # View.between for a derivation that copied: no View (redo it per call, or keep no plan)


@dataclass(frozen=True)
class Recomputed:
    """A derivation that copies (a reshape that cannot view), redone on each call: `View.between(a, b) or
    Recomputed(derive)`."""

    derive: Callable[[torch.Tensor], torch.Tensor]

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.derive(tensor)


def views_between(sources, views) -> tuple | None:
    """View.between each pair, or None when any of them copied."""
    found = tuple(View.between(source, view) for source, view in zip(sources, views))
    return None if COPIED in found else found


@dataclass(frozen=True)
class Allocation:
    """An output's size, strides and dtype, allocated afresh on each call."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def like(tensor: torch.Tensor) -> Allocation:
        return Allocation(tuple(tensor.shape), tensor.stride(), tensor.dtype)

    def new(self, device: torch.device) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=device)

    def fresh(self, device: torch.device) -> torch.Tensor:
        """new(device) as a launcher's fresh call (codegen.launching): a replay calls torch.empty_strided
        itself."""
        return fresh(torch.empty_strided, self.size, self.stride, dtype=self.dtype, device=device)


NO_PLAN_YET = object()  # Plans.get's default: a signature not seen yet (None is one that has no plan)


class Plans(dict):
    """An op's plans by key, forgotten all at once past PLANS_PER_OP."""

    def remember(self, key, plan):
        if len(self) >= PLANS_PER_OP:
            self.clear()
        self[key] = plan
        return plan

"""Tensor types of IR values: shape as sympy expressions, dtype and device.

Shapes come from the fake tensors TorchDynamo records on each fx node
(`node.meta["example_value"]`). Static sizes become sympy Integers, symbolic sizes
keep their sympy expression, so passes can ask `type.static_shape()` and get None when
a size is only known symbolically.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch


def _to_expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


@dataclass(frozen=True)
class TensorType:
    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, value) -> TensorType | None:
        """The type of a (fake) tensor, or None for anything that is not a tensor."""
        if not isinstance(value, torch.Tensor):
            return None
        return cls(tuple(_to_expr(s) for s in value.shape), value.dtype, value.device)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def static_shape(self) -> tuple[int, ...] | None:
        if all(dim.is_Integer for dim in self.shape):
            return tuple(int(dim) for dim in self.shape)
        return None

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{str(self.dtype).removeprefix('torch.')}[{dims}]@{self.device.type}"

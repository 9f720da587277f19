"""A small pattern-matching engine over the IR.

Patterns are trees that mirror the dataflow they describe, read from the output back:

    Op("matmul", Skip({"cast"}, Op("softmax", Any("scores"))), Any("value"))

matches `softmax(s).to(...) @ v` and binds `scores` and `value` to IR nodes. `Op` checks a
node's op, its inputs positionally (both orders for commutative ops) and an optional
`where` predicate; `Skip` steps over any number of unary nodes (casts, identities) before
matching its inner pattern; `Any` matches any node. A failed match returns a Mismatch
naming the node that broke it and why, which passes turn into `report()` near-misses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ir.graph import Graph, Node

COMMUTATIVE = {"add", "mul"}


@dataclass(frozen=True)
class Mismatch:
    node: str
    reason: str

    def __bool__(self) -> bool:
        return False


class Match(dict):
    """Bindings: pattern name -> IR Node."""


class Pattern:
    def match(self, graph: Graph, node: Node, bindings: Match) -> Match | Mismatch:
        raise NotImplementedError


@dataclass
class Any(Pattern):
    bind: str | None = None

    def match(self, graph, node, bindings):
        return _bind(self.bind, node, bindings)


@dataclass
class Op(Pattern):
    op: str
    inputs: tuple = ()
    where: Callable[[Node], bool] | None = None
    bind: str | None = None
    why: str = ""

    def __init__(self, op, *inputs, where=None, bind=None, why=""):
        self.op, self.inputs, self.where, self.bind, self.why = op, inputs, where, bind, why

    def match(self, graph, node, bindings):
        if node.op != self.op:
            return Mismatch(node.name, f"expected {self.op}, found {node.op}")
        if self.where is not None and not self.where(node):
            return Mismatch(node.name, self.why or f"{self.op} attributes do not fit")
        if self.inputs and len(node.inputs) < len(self.inputs):
            return Mismatch(node.name, f"{self.op} has too few tensor inputs")
        orders = [node.inputs]
        if self.op in COMMUTATIVE and len(self.inputs) == 2:
            orders.append(node.inputs[1::-1])
        failure: Mismatch | None = None
        for inputs in orders:
            result = _match_inputs(graph, self.inputs, inputs, Match(bindings))
            if result:
                return _bind(self.bind, node, result)
            failure = failure or result
        return failure


@dataclass
class Skip(Pattern):
    """Step over unary nodes whose op is in `ops`, then match `inner`."""

    ops: frozenset
    inner: Pattern

    def __init__(self, ops, inner):
        self.ops, self.inner = frozenset(ops), inner

    def match(self, graph, node, bindings):
        while node.op in self.ops and node.inputs:
            result = self.inner.match(graph, node, Match(bindings))
            if result:
                return result
            node = graph.node(node.inputs[0])
        return self.inner.match(graph, node, bindings)


def _match_inputs(graph: Graph, patterns, inputs, bindings: Match) -> Match | Mismatch:
    for pattern, name in zip(patterns, inputs):
        result = pattern.match(graph, graph.node(name), bindings)
        if not result:
            return result
        bindings = result
    return bindings


def _bind(name: str | None, node: Node, bindings: Match) -> Match | Mismatch:
    if name is None:
        return bindings
    bound = bindings.get(name)
    if bound is not None and bound is not node:
        return Mismatch(node.name, f"{name} is bound to {bound.name} already")
    result = Match(bindings)
    result[name] = node
    return result


def match(pattern: Pattern, graph: Graph, node: Node) -> Match | Mismatch:
    return pattern.match(graph, node, Match())

"""The IR graph: named nodes in a networkx DiGraph (edge u -> v when v reads u).

A Node has a canonical `op` name with normalised `attrs` (what passes match on), the names
of the nodes it reads (`inputs`, in order), its TensorType, and a `call`: how to lower it
back to fx (the original fx call with `Ref(i)` standing for the i-th input). Nodes created
by rewrites have no call; ir.to_fx lowers them from the op table instead.

A node that writes a tensor in place lists the storages it writes (`writes`). The graph keeps
one invariant about them: no node reads a tensor across a write to its storage, that is, for
an input made at order a and a reader at order c, no write at a < b < c, unless the reader
is a new version that names the write (ir.mutation's read_after_write). `add` refuses a node that
would break it (StaleRead), so a rewrite that looks through a producer cannot miss a write.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import torch.fx

from ir.mutation import storages
from ir.types import TensorType


class StaleRead(ValueError):
    """A node would read `source` across the in-place write `write` to its storage."""

    def __init__(self, reader: str, source: str, write: str):
        super().__init__(f"{reader} would read {source} across the in-place write {write}")
        self.reader, self.source, self.write = reader, source, write


@dataclass(frozen=True)
class Ref:
    """Stands for `node.inputs[index]` inside a call's args/kwargs template."""

    index: int


def map_refs(arg, resolve):
    """Rebuild an args/kwargs template with every Ref replaced by `resolve(ref)`."""
    if isinstance(arg, Ref):
        return resolve(arg)
    if isinstance(arg, (tuple, list)):
        return type(arg)(map_refs(a, resolve) for a in arg)
    if isinstance(arg, dict):
        return {key: map_refs(value, resolve) for key, value in arg.items()}
    if isinstance(arg, slice):
        return slice(map_refs(arg.start, resolve), map_refs(arg.stop, resolve), map_refs(arg.step, resolve))
    return arg


@dataclass
class Call:
    """How a node is written in fx: node kind, target, and args/kwargs templates holding Refs."""

    kind: str
    target: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(eq=False)
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    type: TensorType | None = None
    call: Call | None = None
    value: Any = None
    fx_node: torch.fx.Node | None = None
    order: float = 0.0
    # inputs[:value_inputs] are read for their values; later ones only for their shape or dtype
    # (y in x.expand_as(y), x.type_as(y)). None: every input is read for its values.
    value_inputs: int | None = None
    writes: frozenset = frozenset()  # storages this node writes in place (observably)

    def __repr__(self) -> str:
        return f"{self.name} = {self.op}({', '.join(self.inputs)})"


class Graph:
    def __init__(self, owner: torch.fx.GraphModule | None = None):
        self.owner = owner
        self.nx = nx.DiGraph()
        self._names = itertools.count()
        self._writers: dict[object, list[str]] = {}  # storage -> names of the nodes that write it
        self.changes = 0  # bumped by every edit, so a rewrite driver can tell a sweep changed nothing

    # -- building -------------------------------------------------------------
    def add(self, node: Node, allowed_writes=()) -> Node:
        """Add `node`; StaleRead when it would read an input across a write (but `allowed_writes`)."""
        if node.name in self.nx:
            raise ValueError(f"duplicate IR node name {node.name!r}")
        stale = self.stale_read(node, allowed=allowed_writes)
        if stale is not None:
            raise StaleRead(node.name, *stale)
        for key in node.writes:
            self._writers.setdefault(key, []).append(node.name)
        self.changes += 1
        self.nx.add_node(node.name, node=node)
        for source in node.inputs:
            self.nx.add_edge(source, node.name)
        return node

    def fresh_name(self, hint: str) -> str:
        while True:
            name = f"{hint}_{next(self._names)}"
            if name not in self.nx:
                return name

    # -- queries --------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self.nx.nodes[name]["node"]

    def __contains__(self, name: str) -> bool:
        return name in self.nx

    def __iter__(self) -> Iterator[Node]:
        for name in nx.lexicographical_topological_sort(self.nx, key=lambda n: self.node(n).order):
            yield self.node(name)

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def users(self, name: str) -> list[Node]:
        return [self.node(user) for user in self.nx.successors(name)]

    def ancestors(self, name: str) -> set[str]:
        return nx.ancestors(self.nx, name)

    def stale_read(self, node: Node, position=None, allowed=()) -> tuple[str, str] | None:
        """(input, write) when `node` reads an input across a write to its storage, else None.

        `position` places nodes (default: their order); writes named in `allowed` do not count."""
        if not self._writers:
            return None
        position = position or (lambda name: node.order if name == node.name else self.node(name).order)
        for source in node.inputs:
            made = self.node(source) if source in self.nx else None
            for key in storages(made.value) if made is not None else ():
                for write in self._writers.get(key, ()):
                    between = write in self.nx and position(source) < position(write) < position(node.name)
                    names_it = write in node.inputs and node.attrs.get("target") == "read_after_write"
                    if between and not names_it and write != node.name and write not in allowed:
                        return source, write
        return None

    def writers_of(self, names) -> set[str]:
        """The nodes that write the storage of any of these nodes' values."""
        if not self._writers:
            return set()
        keys = set().union(*(storages(self.node(name).value) for name in names))
        return {write for key in keys for write in self._writers.get(key, ()) if write in self.nx}

    def placeholders(self) -> list[Node]:
        return [node for node in self if node.op == "placeholder"]

    def output(self) -> Node:
        return next(node for node in self.nx.nodes.values() if node["node"].op == "output")["node"]

    # -- rewriting ------------------------------------------------------------
    def set_inputs(self, name: str, inputs: list[str]) -> None:
        node = self.node(name)
        self.changes += node.inputs != list(inputs)
        for source in set(node.inputs) - set(inputs):
            self.nx.remove_edge(source, name)
        node.inputs = list(inputs)
        for source in inputs:
            self.nx.add_edge(source, name)

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of `old` read `new` instead."""
        for user in list(self.nx.successors(old)):
            if user == new:
                continue
            inputs = [new if source == old else source for source in self.node(user).inputs]
            self.set_inputs(user, inputs)

    def remove(self, name: str) -> None:
        if any(True for _ in self.nx.successors(name)):
            raise ValueError(f"cannot remove {name}: it still has users")
        for key in self.node(name).writes:
            self._writers[key].remove(name)
        self.changes += 1
        self.nx.remove_node(name)

    def eliminate_dead_code(self, is_pure) -> int:
        """Remove nodes nobody reads whose op `is_pure(node)`; return how many went.

        A worklist: removing a node puts its inputs back on it, so a dead chain of any length
        goes in time linear in the graph.
        """
        removed = 0
        work = list(self.nx.nodes)
        while work:
            name = work.pop()
            if name not in self.nx or self.nx.out_degree(name):
                continue
            node = self.node(name)
            if node.op in ("output", "placeholder") or not is_pure(node):
                continue
            work.extend(self.nx.predecessors(name))
            self.nx.remove_node(name)
            removed += 1
        return removed

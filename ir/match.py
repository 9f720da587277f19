"""Graph helpers the passes and canonicalisation share.

    NoMatch(node, reason)         a candidate that failed to match: `node` broke it (report()'s near-miss)
    readers_outside(graph, n, S)  who reads node n besides the nodes in S
    check_private(graph, ns, S)   NoMatch unless only the nodes in S read the nodes ns: the fused op
                                  computes them internally, so another reader would find them gone
    int_index(index, shape)       (dim, position) of x[..., i, ...] with one Python int i
"""
from __future__ import annotations

from typing import Iterable

from ir.graph import Graph, Node


class NoMatch(Exception):
    """A candidate that failed to match: `node` broke it, for `reason` (shown in report())."""

    def __init__(self, node: Node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


def readers_outside(graph: Graph, name: str, inside: set[str]) -> list[str]:
    """The nodes that read `name` and are not in `inside`, in the graph's order."""
    return [user.name for user in graph.users(name) if user.name not in inside]


def check_private(graph: Graph, names: Iterable[str], inside: set[str],
                  why: str = "intermediate is also read by {reader}") -> None:
    """Raise NoMatch at the first of `names` read by a node outside `inside`; `why` may name
    the node ({name}) and that reader ({reader})."""
    for name in names:
        outside = readers_outside(graph, name, inside)
        if outside:
            raise NoMatch(graph.node(name), why.format(name=name, reader=outside[0]))


def int_index(index, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(dim, position >= 0) for an index holding one Python int (in range) among full slices,
    Nones (new unit dims) and at most one Ellipsis, trailing dims left out; None otherwise."""
    index = index if isinstance(index, tuple) else (index,)
    ints = [at for at, item in enumerate(index) if isinstance(item, int) and not isinstance(item, bool)]
    if len(ints) != 1 or index.count(Ellipsis) > 1 or not all(
            item is None or item is Ellipsis or item == slice(None) for at, item in enumerate(index) if at != ints[0]):
        return None
    before = [item for item in index[:ints[0]] if item is not None]
    after = [item for item in index[ints[0] + 1:] if item is not None and item is not Ellipsis]
    dim = len(shape) - 1 - len(after) if Ellipsis in before else len(before)
    if len(before) + 1 + len(after) - (Ellipsis in before) > len(shape) or not 0 <= dim < len(shape):
        return None
    position = index[ints[0]]
    return (dim, position % shape[dim]) if -shape[dim] <= position < shape[dim] else None

"""Verifier: structural invariants every pass must keep.

    - the graph is acyclic and every input names a node in the graph
    - edges mirror inputs exactly
    - there is exactly one output node, and every node has a way to be lowered (a fused one: its spec)
    - no node reads a tensor across an in-place write to its storage, in the order lowering
      emits them (ir.graph's invariant)
"""
from __future__ import annotations

import networkx as nx

from ir.graph import Graph
from ir.to_fx import LOWERINGS


class VerificationError(AssertionError):
    pass


def verify(graph: Graph) -> None:
    if not nx.is_directed_acyclic_graph(graph.nx):
        raise VerificationError(f"cycle in IR graph: {nx.find_cycle(graph.nx)}")
    outputs = [node for node in graph if node.op == "output"]
    if len(outputs) != 1:
        raise VerificationError(f"expected one output node, found {len(outputs)}")
    position = {node.name: index for index, node in enumerate(graph)}
    for node in graph:
        for source in node.inputs:
            if source not in graph:
                raise VerificationError(f"{node.name} reads missing node {source}")
        if set(graph.nx.predecessors(node.name)) != set(node.inputs):
            raise VerificationError(f"{node.name}: edges do not match inputs {node.inputs}")
        if node.call is None and "spec" not in node.attrs and node.op not in LOWERINGS:
            raise VerificationError(f"{node.name}: op {node.op} cannot be lowered")
        stale = graph.stale_read(node, position.__getitem__)
        if stale is not None:
            raise VerificationError(f"{node.name} reads {stale[0]} across the in-place write {stale[1]}")

"""Compiler passes, one file per pattern family, run in order by compiler.pipeline.

Each pass is a function `run(graph, context)` that rewrites matched subgraphs of the IR
into fused nodes, each holding a FusedSpec (ir.fused: data, no runtime op; compiler.lower
builds the ops), and records what it fused and what it nearly fused in the report.
A pass raises NoMatch(node, reason) from deep inside a match; `for_each_candidate` turns
it into a near-miss naming that node. Passes import ir (and torch), never runtime or codegen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compiler.report import Fused, NearMiss, Report
from ir.fused import FusedSpec
from ir.graph import Graph, Node, StaleRead
from ir.match import NoMatch


@dataclass
class PassContext:
    graph_index: int
    report: Report
    pinned: dict[str, torch.Tensor] = field(default_factory=dict)

    def fuse(self, graph: Graph, anchor: Node, spec: FusedSpec, inputs: list[str], replaced: list[str],
             detail: str) -> Node:
        """Replace `anchor` (the last node of a match) by a fused node holding `spec`, which reads `inputs`.

        Raises NoMatch when a replaced node writes memory someone else may see, or when the fused
        op would read an input across an in-place write to it (ir.graph's invariant). A write that
        reads the match's own results (state.copy_(h) of a decode step) comes after the fused op."""
        writers = [graph.node(name) for name in replaced if name in graph and graph.node(name).writes]
        if writers:
            raise NoMatch(writers[0], "writes a tensor in place that something else reads afterwards")
        written = graph.writers_of([anchor.name]) - set(replaced)
        if written:  # the fused op's output need not alias what the anchor's did
            raise NoMatch(graph.node(min(written)), f"writes {anchor.name} (or a view of it) in place")
        name = graph.fresh_name(spec.family)
        fused = Node(name=name, op=spec.family, inputs=inputs, attrs={"spec": spec, "replaced": tuple(replaced)},
                     type=anchor.type, value=anchor.value, order=anchor.order)
        try:
            graph.add(fused, allowed_writes=self._writes_after(graph, replaced, inputs))
        except StaleRead as stale:
            raise NoMatch(graph.node(stale.write), f"writes {stale.source} in place before the fused op "
                                                   "would read it") from None
        graph.replace_uses(anchor.name, name)
        self.report.fused.append(Fused(self.graph_index, spec.family, name, detail, tuple(replaced)))
        return fused

    @staticmethod
    def _writes_after(graph: Graph, replaced: list[str], inputs: list[str]) -> set[str]:
        """Writes to the inputs' storage that read a replaced node: they follow the fused op."""
        replaced = set(replaced)
        return {write for write in graph.writers_of(inputs) if graph.ancestors(write) & replaced}

    def near_miss(self, pattern: str, anchor: Node, node: str, reason: str) -> None:
        self.report.near_misses.append(NearMiss(self.graph_index, pattern, anchor.name, node, reason))

    def for_each_candidate(self, pattern: str, graph: Graph, nodes, try_fuse) -> None:
        """Call `try_fuse(node)` on each node still in the graph; a NoMatch becomes a near-miss."""
        for node in nodes:
            if node.name not in graph:
                continue
            try:
                try_fuse(node)
            except NoMatch as miss:
                self.near_miss(pattern, node, miss.node.name, miss.reason)

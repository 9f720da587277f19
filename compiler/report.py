"""What a compilation matched, what it left to PyTorch, and why.

Passes record `Fused` entries (a pattern replaced by a kernel) and `NearMiss` entries (a
candidate that looked like a pattern until one node broke it). Fused ops add, at run
time, how often they fell back to PyTorch and why (under CUDA graphs, the calls made while
Inductor warmed up and recorded: replays run no Python), and, compiled for CUDA graphs, which of
them run outside the graphs and why. `Report.render()` is what `compiled.report()` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fused:
    graph: int
    pattern: str
    op_name: str
    detail: str
    replaced: tuple[str, ...]


@dataclass(frozen=True)
class NearMiss:
    graph: int
    pattern: str
    anchor: str
    node: str
    reason: str


@dataclass
class Report:
    graphs: int = 0
    inductor_graphs: int = 0  # graphs whose unfused rest Inductor compiled
    fused: list[Fused] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ops: list = field(default_factory=list)

    def render(self) -> str:
        lines = [f"flashfx: {self.graphs} graph(s) captured, {len(self.fused)} fused op(s)"
                 + (f"; Inductor compiled the rest of {self.inductor_graphs}" if self.inductor_graphs else "")]
        for entry in self.fused:
            lines.append(f"  [graph {entry.graph}] {entry.pattern}: {entry.op_name} ({entry.detail}); "
                         f"replaced {len(entry.replaced)} nodes ending at {entry.replaced[-1]}")
        if self.near_misses:
            lines.append("left to PyTorch:")
        for miss in self.near_misses:
            lines.append(f"  [graph {miss.graph}] {miss.pattern} at {miss.anchor}: node {miss.node}: {miss.reason}")
        for op in self.ops:
            for reason, count in op.fallbacks.items():
                lines.append(f"  {op.pattern} op {op.label} ran in PyTorch {count}x: {reason}")
            if op.host_synced:
                lines.append(f"  {op.pattern} op {op.label} runs outside CUDA graphs: {op.host_sync_reason}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

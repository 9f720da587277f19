"""Lowering: the one step that turns the fused nodes the passes left into runtime ops and the
graph into fx. It runs after the passes and the verifier, and is the only place that builds ops,
renders, stores and loads their kernels, and tells them the compile mode: the autotuner reads
its tuning mode when a kernel first launches, and CUDA_GRAPHS ("reduce-overhead", whose graphs
Inductor runs under CUDA graphs) builds them sync-free (runtime.dispatch.FusedOp.sync_free).

    for each fused node, in the order the passes fused them:
        family = runtime.families.FAMILIES[spec.op]            # the family's declared contract
        op = family.op(replaced, mode=tuning_mode(mode), **spec.params)
        op.sync_free = mode == CUDA_GRAPHS
        op.differentiable = the node's captured value requires grad (TorchDynamo guards on it)
        op.prepare(*spec.example)                             # render, store, load its kernels
        report.ops.append(op)
    ir.to_fx(graph)                                           # each op a torch.ops.flashfx.<op> call
"""
from __future__ import annotations

import torch
import torch.fx

from compiler.report import Report
from ir.graph import Graph, Node
from ir.to_fx import to_fx
from runtime.autotune import MODES
from runtime.dispatch import FusedOp
from runtime.families import FAMILIES

CUDA_GRAPHS = "reduce-overhead"  # torch.compile's name for the mode that runs graphs under CUDA graphs
COMPILE_MODES = (*MODES, CUDA_GRAPHS)


def tuning_mode(mode: str) -> str:
    """The autotuner's mode for a compile mode: CUDA_GRAPHS tunes as "default" does."""
    return "default" if mode == CUDA_GRAPHS else mode


def lower(graph: Graph, report: Report, graph_index: int, mode: str) -> torch.fx.GraphModule:
    """The fx graph of `graph` (graph number `graph_index` of `report`), every fused node built."""
    for entry in report.fused:
        if entry.graph == graph_index and entry.op_name in graph:
            node = graph.node(entry.op_name)
            node.attrs["module"] = build(node, mode)
            report.ops.append(node.attrs["module"])
    return to_fx(graph)


def build(node: Node, mode: str) -> FusedOp:
    """The runtime op of a fused node, its kernels loaded."""
    spec = node.attrs["spec"]
    family = FAMILIES[spec.op]
    op = family.op(node.attrs["replaced"], mode=tuning_mode(mode), **spec.params)
    if op.pattern != spec.family:
        raise ValueError(f"{node.name}: a {spec.family} spec names the {op.pattern} op {spec.op!r}")
    op.label = node.name
    op.sync_free = mode == CUDA_GRAPHS
    op.differentiable = _requires_grad(node.value)
    op.prepare(*spec.example)
    return op


def _requires_grad(value) -> bool:
    """Does a captured value (a fake tensor, or a tuple of them) require grad? Then the graph was
    captured for training, and TorchDynamo guards on that."""
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(item) for item in value)
    return isinstance(value, torch.Tensor) and value.requires_grad

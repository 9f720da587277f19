"""The pass pipeline for one captured graph.

    fx GraphModule --from_fx--> IR --canonicalize--> passes (attention, ...: fused nodes holding specs)
    --dce--> unmatched anchors reported --> verify --lower (build the ops, load their kernels; to_fx)--> GraphModule

Module state among the graph's inputs (buffers and plain tensor attributes, not parameters) is
"pinned": passes may evaluate masks and scales computed from it at compile time. The fused op then
checks on every call that the value the graph computes from that state is still the one folded in
(runtime.attention), since writes through `.data`, `.numpy()` or the storage bypass the version counter.
"""
from __future__ import annotations

import torch
import torch.fx

from compiler.lower import lower
from compiler.passes import PassContext, attention, long_conv, short_conv, sparse_mlp, ssd_scan, ssm_scan, unmatched
from compiler.report import Report
from ir.canonicalize import canonicalize
from ir.from_fx import from_fx
from ir.graph import Node
from ir.verify import verify

PASSES = (attention.run, sparse_mlp.run, ssd_scan.run, ssm_scan.run, long_conv.run, short_conv.run)
# Calls kept even when nobody reads their result: vmap's level bookkeeping (torch's
# associative_scan traces into vmapped combines on CPU) brackets the calls between them.
EFFECTFUL = ("print", "_vmap_increment_nesting", "_vmap_decrement_nesting")


def compile_graph(gm: torch.fx.GraphModule, example_inputs, report: Report,
                  mode: str = "default") -> torch.fx.GraphModule:
    graph = canonicalize(from_fx(gm))
    graph.eliminate_dead_code(_is_pure)
    verify(graph)
    context = PassContext(graph_index=report.graphs, report=report, pinned=_pinned_buffers(gm, example_inputs))
    report.graphs += 1
    for run_pass in PASSES:
        run_pass(graph, context)
    graph.eliminate_dead_code(_is_pure)
    unmatched.run(graph, context)
    verify(graph)
    return lower(graph, report, context.graph_index, mode)


def _pinned_buffers(gm: torch.fx.GraphModule, example_inputs) -> dict[str, torch.Tensor]:
    """Placeholders that hold module state (buffers, tensor attributes; not parameters, not user
    inputs), with their tensors."""
    from torch._dynamo.source import AttrSource  # here: importing Dynamo imports Triton (see runtime.interpret)

    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    pinned = {}
    for node, value in zip(placeholders, example_inputs):
        source = getattr(node.meta.get("grapharg"), "source", None)
        state = source is not None and ("_buffers[" in source.name or (
            isinstance(source, AttrSource) and "_parameters[" not in source.name))
        if state and isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            pinned[node.name] = value
    return pinned


def _is_pure(node: Node) -> bool:
    """May this node be dropped when nobody reads it? Calls that write memory others may observe
    (ir.mutation) and effectful calls may not."""
    if node.writes:
        return False
    call = node.call
    if call is None or node.op != "torch":
        return True
    if call.kind not in ("call_function", "call_method"):
        return False
    name = call.target if isinstance(call.target, str) else getattr(call.target, "__name__", "")
    return name not in EFFECTFUL

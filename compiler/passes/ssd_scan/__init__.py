"""SSD pass (Mamba-2's state-space dual layer, Dao & Gu 2024): one fused op per SSD scan.

Per head h with a scalar decay A_h: S_t = exp(Δ_t A_h) S_{t-1} + Δ_t x_t ⊗ B_t, y_t = S_t C_t
(+ D x_t) (* silu(z_t)). Recognised, after ir.canonicalize (n-operand einsums split into products,
segment sums as one segsum op), in the forms code writes it:

    chunked   Hugging Face's mamba2_chunk_scan (Mamba2, Bamba, Zamba2, NemotronH, FalconH1,
              GraniteMoeHybrid) and mamba_ssm's ssd_minimal_discrete (torch or einops): the decay mask
              exp(segsum(a)) inside C B^T ∘ L @ X, chunk states, state passing, the off-diagonal term
              (chunked.py); the candidate is each segsum
    decode    one step from a carried state, S' = exp(Δ A) S + Δ x ⊗ B, y = S' C, the state written
              back in place by the graph's own copy_ (Hugging Face's and mamba_ssm's step; decode.py);
              the candidate is each add of rank 4
    loop      that step in a Python loop over time from a zero state, unrolled by tracing, the outputs
              stacked (loop.py): each step recognised as a decode step, the steps chained; it runs as
              the chunked scan. The candidate is each stack of rank 4

and folded into the op around it: Δ = clamp(softplus(dt + dt_bias), lo, hi), B and C per group of
heads, D skip, silu(z) gate, casts and views (operands.py). A candidate that breaks is reported
with the node that broke it.

A loop with a per-head scalar decay belongs here, not to ssm_scan: Mamba-1's scan would compute it
(d = h * p channels, A and Δ repeated along p) but pays an exp per (h, p, n) element and no matmul,
while the scalar decay is exactly what lets the chunked SSD kernel run it on tensor cores; its
state is (b, h, p, n), where ssm_scan's re-rolling reads (b, d, n). Loops are tried first, then
chunked forms, then decode steps (a loop's steps are decode steps, fused together).
"""
from __future__ import annotations

from compiler.passes import PassContext
from compiler.passes.ssd_scan.chunked import fuse_chunked, is_candidate
from compiler.passes.ssd_scan.decode import fuse_decode_step, is_step_candidate
from compiler.passes.ssd_scan.loop import fuse_loop, is_loop_candidate
from ir.graph import Graph, Node

PATTERN = "ssd_scan"


def run(graph: Graph, context: PassContext) -> None:
    def try_scan(node: Node) -> None:
        if is_loop_candidate(node):
            fuse_loop(graph, node, context)
        elif is_candidate(node):
            fuse_chunked(graph, node, context)

    def try_step(node: Node) -> None:
        if is_step_candidate(node) and node.name not in fused:
            fuse_decode_step(graph, node, context)

    context.for_each_candidate(PATTERN, graph, list(graph), try_scan)
    fused = {name for entry in context.report.fused if entry.graph == context.graph_index
             for name in entry.replaced}  # a fused loop's steps are no decode steps of their own
    context.for_each_candidate(PATTERN, graph, list(graph), try_step)

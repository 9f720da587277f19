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

and folded into the op around it: Δ = clamp(softplus(dt + dt_bias), lo, hi), B and C per group of
heads, D skip, silu(z) gate, casts and views (operands.py). A candidate that breaks is reported
with the node that broke it.

A plain loop over time with a per-head scalar decay is the same recurrence; it is left to the
ssm_scan family's loop re-rolling (a Mamba-1 scan with d = h * p channels computes it exactly),
which does not yet take the rank-4 state: see the README.
"""
from __future__ import annotations

from compiler.passes import PassContext
from compiler.passes.ssd_scan.chunked import fuse_chunked, is_candidate
from compiler.passes.ssd_scan.decode import fuse_decode_step, is_step_candidate
from ir.graph import Graph, Node

PATTERN = "ssd_scan"


def run(graph: Graph, context: PassContext) -> None:
    def try_fuse(node: Node) -> None:
        if is_candidate(node):
            fuse_chunked(graph, node, context)
        elif is_step_candidate(node):
            fuse_decode_step(graph, node, context)

    context.for_each_candidate(PATTERN, graph, list(graph), try_fuse)

"""SSM scan pass (Mamba's selective scan, Gu & Dao 2023): roll an unrolled recurrence back into one scan.

Tracing a Python loop over L unrolls the recurrence into L copies of one step. Recognised
(after ir.canonicalize), for i = 0..L-1:

    h_i = select(Ā, t, i) * h_{i-1} + select(B̄u, t, i)        h_{-1} = zeros
    y_i = <h_i, C_i> over the state dim n                       C_i = select(C, t', i), spelled
          einsum("bdn,bn->bd", h, C_i) | matmul(h, C_i[..., None])[..., 0] | sum(h * C_i, n)
    y   = stack([y_0, ..., y_{L-1}], dim) | cat([y_i[..., None], ...], dim)       the anchor
        | cat([matmul(h_i, C_i[..., None]), ...], -1)
        | <stack([h_0, ..., h_{L-1}], dim), C>     the states stacked, then read out (mamba.py)
        (a preallocated output filled in the loop, out[:, :, i] = y_i, arrives as a stack:
        ir.canonicalize functionalises it)

and folded into the fused op around it (each part optional, casts and views anywhere):

    Ā = exp(Δ ⊗ A),  B̄u = Δ ⊗ B ⊗ u      einsum or broadcast muls; B, C per group of channels
                                         through repeat_interleave / repeat_kv
    Δ = softplus(Δ' + delta_bias)
    out = (y + u * D) * silu(z)

Matching is linear in the graph: each step is parsed once and compared with the step before it
(same sequences, same select dims, index i, h_{i-1} feeding h_i). Every tensor's dims are then
labelled by role (b batch, d channel, n state, l time) from how they line up in the products: n
is the dim the readout contracts, and b, d are the assignment of h's other two dims under which
every operand has the dims it may have (A: d, n; u, Δ, z: b, d, l; D, bias: d). When two
assignments fit, the data is symmetric in them and either is right.

The decode form, one step from a carried state S (mamba_ssm's and Hugging Face's
selective_state_update), becomes a state update (runtime's StateUpdateOp):

    h = exp(Δ ⊗ A) * S + Δ ⊗ B ⊗ x,   y = <h, C>  (+ x * D) (* silu(z))

torch's associative_scan over (Ā, B̄u) (Hugging Face's default path) is recognised both as the
higher-order op (CUDA) and as the log2(L) levels of slices and combines it decomposes into on
the CPU, by evaluating that region on symbols (see associative.py).

Either op also returns the final state when the graph reads it. Candidates that break somewhere
(a step of a different shape, a non-zero initial state, complex tensors...) are reported as
near-misses naming the node.

Unrolling makes capture cost grow with L (TorchDynamo traces every step: 15-20 s per layer at
L 1024 on a CPU core, against well under a second for matching); `register_rolled(fn)` (compiler.rolled)
keeps a scan function rolled instead, and the pass fuses the one op Dynamo records.

    frames.py       which recurrence axis each dim of a tensor holds; factors of products
    recurrence.py   readouts, the unrolled loop, the decode step
    associative.py  torch's associative_scan: the higher-order op, and its decomposition
    rolled.py       the one op a rolled scan function is recorded as (compiler.register_rolled)
    lowering.py     discretisation, epilogue, roles, the fused op's layout; fusing it in
"""
from __future__ import annotations

from compiler.passes import PassContext
from compiler.passes.ssm_scan.associative import fuse_associative, is_candidate
from compiler.passes.ssm_scan.recurrence import fuse_decode, fuse_loop
from compiler.passes.ssm_scan.rolled import fuse_rolled, is_rolled
from ir.graph import Graph, Node

PATTERN = "ssm_scan"

__all__ = ["PATTERN", "run"]


def run(graph: Graph, context: PassContext) -> None:
    def try_scan(node: Node) -> None:
        if node.op in ("stack", "cat"):
            fuse_loop(graph, node, context)
        elif is_rolled(node):
            fuse_rolled(graph, node, context)
        elif is_candidate(node):
            fuse_associative(graph, node, context)

    def try_decode(node: Node) -> None:
        if node.op == "add" and node.name not in fused:
            fuse_decode(graph, node, context)

    context.for_each_candidate(PATTERN, graph, list(graph), try_scan)
    fused = {name for entry in context.report.fused if entry.graph == context.graph_index
             for name in entry.replaced}  # a fused loop's steps are no decode steps of their own
    context.for_each_candidate(PATTERN, graph, list(graph), try_decode)

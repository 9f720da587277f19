"""The SSD as a plain loop over time, unrolled by tracing: each step a decode step (decode.py)
from the state before it, the outputs stacked along time.

    S_{-1} = zeros;  for t:  S_t = exp(Δ_t ⊗ A) S_{t-1} + Δ_t x_t ⊗ B_t,  y_t = S_t C_t
    y = stack([y_0, ..., y_{L-1}], dim)                                  the anchor

Every step is recognised on its own (so each is proven an SSD step), and they must chain: step t
reads S_{t-1}, and its x, Δ, B, C are select(sequence, dim, t) of the same sequences along the
same dims as step 0 (A and dt_bias the same tensors). The loop then runs as the chunked scan,
whose per-head scalar decay is the same recurrence (Mamba-2's SSD), and its epilogue (+ D x,
* silu(z)) follows the stack.
"""
from __future__ import annotations

from compiler.passes import NoMatch, PassContext
from compiler.passes.ssd_scan.decode import Step, match_step
from compiler.passes.ssd_scan.operands import Discretised, fuse_scan, step_sizes
from compiler.passes.ssd_scan.roles import Leaf, static_shape, through_casts
from ir.graph import Graph, Node

ZEROS = ("zeros", "new_zeros", "zeros_like")
PER_STEP = ("x", "dt", "B", "C")


def is_loop_candidate(node: Node) -> bool:
    return node.op == "stack" and len(node.inputs) > 1 and node.type is not None and node.type.rank == 4


def fuse_loop(graph: Graph, stack: Node, context: PassContext) -> None:
    states = [_read_out_state(graph, graph.node(name)) for name in stack.inputs]
    if states[0] is None:
        return  # not a loop of readouts of rank-4 states
    steps = []
    for t, (y, h) in enumerate(zip(stack.inputs, states)):
        step = match_step(graph, h) if h is not None else None
        if step is None or step.y.node.name != y:
            raise NoMatch(graph.node(y), f"step {t}'s output is not an SSD step's readout")
        _check_chain(graph, steps[-1] if steps else None, step, t)
        steps.append(step)
    time = stack.attrs["dim"]
    disc = _sequences(graph, steps)
    y_roles = steps[0].y.roles[:time] + ("l",) + steps[0].y.roles[time:]
    last = steps[-1].new_state
    core = set().union(*(step.core for step in steps)) - {last.node.name}
    fuse_scan(graph, context, disc, Leaf(stack, y_roles), 0, last, None, core, f"loop over time, L={len(steps)}")


def _read_out_state(graph: Graph, y: Node) -> Node | None:
    """The rank-4 add whose readout y is, within a few reads of it."""
    frontier = [y]
    for _ in range(6):
        found = [node for node in frontier if node.op == "add" and node.type is not None and node.type.rank == 4]
        if found:
            return found[0]
        frontier = [graph.node(name) for node in frontier for name in node.inputs]
    return None


def _check_chain(graph: Graph, previous: Step | None, step: Step, t: int) -> None:
    if previous is None:
        start = through_casts(graph, step.state.node)
        if start.op != "torch" or start.attrs["target"] not in ZEROS:
            raise NoMatch(start, "the loop does not start from a zero state")
        return
    if step.state.node is not previous.new_state.node:
        raise NoMatch(step.state.node, f"step {t} does not read step {t - 1}'s state")
    for name in ("A", "dt_bias"):
        ours, first = getattr(step.disc, name), getattr(previous.disc, name)
        if (ours is None) != (first is None) or (ours is not None and ours.node is not first.node):
            raise NoMatch(step.new_state.node, f"step {t} reads another {name} than step {t - 1}")
    if (step.disc.softplus, step.disc.limit, step.disc.groups) != (previous.disc.softplus, previous.disc.limit,
                                                                   previous.disc.groups):
        raise NoMatch(step.new_state.node, f"step {t} computes its step size or groups otherwise than step {t - 1}")


def _sequences(graph: Graph, steps: list[Step]) -> Discretised:
    """The step inputs as sequences: each per-step input is select(sequence, dim, t), the same
    sequence and dim at every step; the sequence's roles gain l at dim."""
    found = {}
    for name in PER_STEP:
        leaves = [getattr(step.disc, name) for step in steps]
        first = leaves[0].node
        if first.op != "select" or first.attrs["index"] != 0:
            raise NoMatch(first, f"{name} of step 0 is not a select at time 0 of a sequence")
        dim = first.attrs["dim"]
        for t, leaf in enumerate(leaves):
            node = leaf.node
            if node.op != "select" or node.inputs != first.inputs or (node.attrs["dim"], node.attrs["index"]) != (dim, t):
                raise NoMatch(node, f"{name} of step {t} is not select({first.inputs[0]}, {dim}, {t})")
        sequence = graph.node(first.inputs[0])
        if static_shape(sequence)[dim] != len(steps):
            raise NoMatch(sequence, f"{name}'s sequence has {static_shape(sequence)[dim]} steps, the loop {len(steps)}")
        found[name] = Leaf(sequence, leaves[0].roles[:dim] + ("l",) + leaves[0].roles[dim:])
    disc = steps[0].disc
    if disc.dt_bias is None and not disc.softplus and disc.limit is None:  # Δ made for the whole sequence first
        raw, bias, softplus, limit = step_sizes(graph, found["dt"])
        return Discretised(found["x"], raw, disc.A, found["B"], found["C"], disc.groups, bias, softplus, limit)
    return Discretised(found["x"], found["dt"], disc.A, found["B"], found["C"], disc.groups, disc.dt_bias,
                       disc.softplus, disc.limit)

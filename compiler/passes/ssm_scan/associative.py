"""torch's associative_scan over (Ā, B̄u) with the combine (a0, b0), (a1, b1) -> (a0 a1, a1 b0 + b1).

Hugging Face's Mamba (`use_associative_scan=True`, the default) calls
`associative_scan(combine_fn, (Ā, B̄u), dim=t)`, and TorchDynamo records one of two graphs:

    pointwise mode (CUDA)   movedim(Ā, t, 0), movedim(B̄u, t, 0)
                            -> higher_order.associative_scan(combine, [Ā', B̄u'], ())[1] -> movedim(., 0, t)
                            the combine subgraph is checked op by op
    generic mode (CPU)      the scan decomposed while tracing: log2(L) levels of strided slices,
                            vmapped combines (mul, mul, add), cat, stack + flatten (interleave),
                            pad, then movedim(., 0, t)

A decomposed region is verified by evaluating it on symbols. Each row (along time) of each tensor
in it is the composition of a run of steps: ("a", i, j) = Ā_j ... Ā_i, ("b", i, j) = the state
after steps i..j from zero, ("p", i, j, k) = Ā_k ... Ā_{j+1} times ("b", i, j). Slices, cats,
interleaves and pads move rows; mul and add compose adjacent runs (or fail):

    ("a", i, j) * ("a", j+1, k) = ("a", i, k)       ("a", j+1, k) * ("b", i, j) = ("p", i, j, k)
    ("p", i, j, k) + ("b", j+1, k) = ("b", i, k)

The region computes the scan iff its output rows are ("b", 0, t) for t = 0..L-1. Either way the
states S = (h_0, ..., h_{L-1}) then meet the readout over the whole sequence,
matmul(view(S), C[..., None]) followed by views, and S[:, :, -1] is the final state.
"""
from __future__ import annotations

import itertools
import operator

import torch

from compiler.passes import PassContext
from compiler.passes.ssm_scan.frames import TIME, Frame, Leaf, NoMatch, is_real_cast, static_shape, through_casts, unit_free
from compiler.passes.ssm_scan.lowering import (
    assign_roles, build_layout, describe, discretisation, find_epilogues, fuse_op, sole_user)
from ir.fused import FusedSpec
from ir.graph import Graph, Node, Ref

REGION_CALLS = ("slice", "_add_batch_dim", "_remove_batch_dim")
MULS, ADDS = (operator.mul, torch.mul), (operator.add, torch.add)


def is_candidate(node: Node) -> bool:
    """movedim(x, 0, t): where an associative_scan's output returns to its layout."""
    moved = _movedim(node)
    return moved is not None and moved[0] == 0 and node.type.rank == 4 and node.type.static_shape() is not None


def fuse_associative(graph: Graph, node: Node, context: PassContext) -> None:
    found = _scan(graph, node)
    if found is None:
        return
    form, decay, update, region = found
    seqlen = static_shape(node)[decay.frame.index(TIME)]
    readout = _sequence_readout(graph, node, decay.frame)
    if readout is None:
        raise NoMatch(node, "the scanned states are not read out as <h_t, C_t> (matmul(S, C[..., None]))")
    y, y_frame, c, n, readout_nodes = readout
    final = next((user for user in graph.users(node.name) if user.op == "select"
                  and user.attrs["dim"] == decay.frame.index(TIME) and user.attrs["index"] == seqlen - 1), None)
    inside = region | {node.name, *readout_nodes} | ({final.name} if final is not None else set())
    elsewhere = [user.name for user in graph.users(node.name) if user.name not in inside]
    if elsewhere:
        raise NoMatch(graph.node(elsewhere[0]), "reads the states of every step, which the kernel never stores")
    core = discretisation(graph, decay, update, c, n)
    plan = assign_roles(graph, core, find_epilogues(graph, y, unit_free(y, y_frame)))
    layout = build_layout(plan, decay, final, seqlen)
    replaced = sorted(region, key=lambda name: graph.node(name).order) + [node.name] + readout_nodes + plan.epilogue.nodes
    detail = f"associative_scan ({form}), L={seqlen}, {describe(layout, plan.groups)}"
    fuse_op(graph, context, plan, FusedSpec("ssm_scan", dict(layout=layout)), detail, replaced, final,
            inside | set(plan.epilogue.nodes))


def _movedim(node: Node) -> tuple[int, int] | None:
    """(source, destination) dims of a torch.movedim with int dims."""
    if node.op != "torch" or node.attrs["target"] != "movedim" or node.type is None:
        return None
    args = node.call.args
    if len(args) != 3 or not all(isinstance(dim, int) for dim in args[1:]):
        return None
    return args[1] % node.type.rank, args[2] % node.type.rank


def _scan(graph: Graph, node: Node):
    """(form, Ā leaf, B̄u leaf, region) when node = movedim(scan's second output, 0, t); None when
    node is no associative_scan output."""
    time = _movedim(node)[1]
    frame = tuple(TIME if k == time else k - (k > time) for k in range(4))
    source = graph.node(node.inputs[0])
    operands = _pointwise_operands(graph, source)
    if operands is not None:
        form, region = "pointwise", {source.name, source.inputs[0]}
    else:
        form, (region, operands) = "decomposed", _decomposed(graph, source)
        if region is None:
            return None
    sequences = []
    for operand in operands:
        moved = _movedim(operand)
        if moved != (time, 0) or static_shape(graph.node(operand.inputs[0])) != static_shape(node):
            raise NoMatch(operand, f"the scan's operand is not the sequence moved from dim {time}, the output's")
        sequences.append(Leaf(graph.node(operand.inputs[0]), frame))
    return form, sequences[0], sequences[1], region


# -- pointwise mode: the higher-order op ------------------------------------------------------------
def _pointwise_operands(graph: Graph, source: Node) -> list[Node] | None:
    """[Ā', B̄u'] when source = associative_scan(combine, [Ā', B̄u'], ())[1] with the first-order combine."""
    if source.op != "torch" or source.attrs["target"] != "getitem" or source.call.args[1:] != (1,):
        return None
    scan = graph.node(source.inputs[0])
    if scan.op != "torch" or scan.attrs["target"] != "associative_scan":
        return None
    combine, xs, extra = scan.call.args[:3]
    if not isinstance(combine, Ref) or len(xs) != 2 or extra:
        raise NoMatch(scan, "associative_scan over other than two sequences, or with extra inputs")
    subgraph = graph.owner.get_submodule(graph.node(scan.inputs[combine.index]).call.target).graph
    if not _first_order_combine(subgraph):
        raise NoMatch(scan, "the combine is not (a0, b0), (a1, b1) -> (a0 a1, a1 b0 + b1)")
    return [graph.node(scan.inputs[x.index]) for x in xs]


def _first_order_combine(subgraph: torch.fx.Graph) -> bool:
    nodes = list(subgraph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    calls = [node for node in nodes if node.op == "call_function"]
    outputs = next(node for node in nodes if node.op == "output").args[0]
    if len(inputs) != 4 or len(calls) != 3 or len(outputs) != 2:
        return False
    a_left, b_left, a_right, b_right = inputs
    a_out, b_out = outputs
    if not _call(a_out, MULS, a_left, a_right) or b_out.target not in ADDS or len(b_out.args) != 2:
        return False
    return any(_call(product, MULS, a_right, b_left) and other is b_right
               for product, other in itertools.permutations(b_out.args))


def _call(node, targets, x, y) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets
            and not node.kwargs and sorted(map(id, node.args)) == sorted(map(id, (x, y))))


# -- generic mode: the decomposed scan ---------------------------------------------------------------
def _decomposed(graph: Graph, output: Node) -> tuple[set[str] | None, list[Node]]:
    """(region, [Ā', B̄u']) when the nodes under `output` are a decomposed first-order scan."""
    region, starts = _region(graph, output)
    if region is None or len(starts) != 2:
        if region is not None and starts and static_shape(starts[0])[0] == 1:
            raise NoMatch(output, "an associative_scan over one step never reads Ā: nothing to fuse")
        return None, []
    seqlen = static_shape(starts[0])[0]
    prefix = [("b", 0, t) for t in range(seqlen)]
    for decay, update in itertools.permutations(starts):
        rows = _evaluate(graph, region, {decay.name: "a", update.name: "b"}, seqlen)
        if rows is not None and rows.get(output.name) == prefix:
            return region, [decay, update]
    raise NoMatch(output, "slices and combines that do not compute the scan (a0 a1, a1 b0 + b1) over time")


def _region(graph: Graph, output: Node) -> tuple[set[str] | None, list[Node]]:
    """The nodes between output and the movedim(x, t, 0) it starts from, if all are of the kinds a
    decomposed scan uses."""
    region: set[str] = set()
    starts: dict[str, Node] = {}
    pending = [output]
    while pending:
        node = pending.pop()
        if node.name in region or node.name in starts:
            continue
        moved = _movedim(node)
        if moved is not None and moved[1] == 0:
            starts[node.name] = node
            continue
        if not (node.op in ("mul", "add", "stack", "cat", "reshape", "pad")
                or (node.op == "torch" and node.attrs["target"] in REGION_CALLS)):
            return None, []
        region.add(node.name)
        pending.extend(graph.node(name) for name in node.inputs)
    return region, list(starts.values())


def _evaluate(graph: Graph, region: set[str], starts: dict[str, str], seqlen: int) -> dict | None:
    rows = {name: [(kind, t, t) for t in range(seqlen)] for name, kind in starts.items()}
    for node in sorted((graph.node(name) for name in region), key=lambda node: node.order):
        inputs = [rows.get(name) for name in node.inputs]
        value = None if any(x is None for x in inputs) else _rows(graph, node, inputs)
        if value is None:
            return None
        rows[node.name] = value
    return rows


def _rows(graph: Graph, node: Node, inputs: list[list]) -> list | None:
    """The rows of `node` from its inputs' rows; None when it is not a move or a composition along time."""
    if node.op == "torch":
        return _moved_rows(node, inputs[0])
    if node.op in ("mul", "add"):
        if node.attrs["scalar"] is not None or len(inputs) != 2 or len(inputs[0]) != len(inputs[1]):
            return None
        compose = _product if node.op == "mul" else _sum
        rows = [compose(x, y) for x, y in zip(*inputs)]
        return None if None in rows else rows
    if node.op == "stack" and node.attrs["dim"] == 1 and len(inputs) == 2 and len(inputs[0]) == len(inputs[1]):
        return [("pair", x, y) for x, y in zip(*inputs)]
    if node.op == "cat" and node.attrs["dim"] == 0:
        return [row for rows in inputs for row in rows]
    if node.op == "pad":
        widths = list(node.attrs["pad"])
        at_end = widths[-2:] == [0, 1] and not any(widths[:-2]) and len(widths) == 2 * node.type.rank
        return inputs[0] + [("zero",)] if at_end and node.attrs["mode"] == "constant" and node.attrs["value"] == 0 else None
    if node.op == "reshape" and inputs[0] and all(row[0] == "pair" for row in inputs[0]):
        source = static_shape(graph.node(node.inputs[0]))
        if static_shape(node) != (2 * source[0],) + source[2:]:
            return None
        return [row for pair in inputs[0] for row in pair[1:]]
    return None


def _moved_rows(node: Node, rows: list) -> list | None:
    """Rows after aten.slice along time, or vmap's batch-dim bookkeeping at dim 0."""
    target, args = node.attrs["target"], node.call.args
    if target == "slice":
        dim, start, end, step = (tuple(args[1:]) + (0, None, None, 1)[len(args) - 1:])[:4]
        return rows[start:end:step] if dim == 0 else None
    if target == "_add_batch_dim":
        return rows if args[1] == 0 else None
    if target == "_remove_batch_dim":
        return rows if args[3] == 0 and args[2] == len(rows) else None
    return None


def _product(x: tuple, y: tuple) -> tuple | None:
    for p, q in ((x, y), (y, x)):
        if p[0] == "a" and q[0] == "a" and p[2] + 1 == q[1]:
            return ("a", p[1], q[2])
        if p[0] == "a" and q[0] == "b" and q[2] + 1 == p[1]:
            return ("p", q[1], q[2], p[2])
    return None


def _sum(x: tuple, y: tuple) -> tuple | None:
    for p, q in ((x, y), (y, x)):
        if p[0] == "p" and q[0] == "b" and q[1] == p[2] + 1 and q[2] == p[3]:
            return ("b", p[1], q[2])
    return None


# -- the readout over the whole sequence -----------------------------------------------------------
def _sequence_readout(graph: Graph, states: Node, frame: Frame):
    """(y, y's frame, C leaf, n, nodes) for y = <S_t, C_t> at every t: views of S, matmul with
    C[..., None] (C's batch dims lined up with S's), then views."""
    pending = [(states, frame, [])]
    while pending:
        node, node_frame, path = pending.pop()
        for user in graph.users(node.name):
            if user.op == "matmul" and user.inputs[0] == node.name:
                found = _matmul_over_time(graph, node, node_frame, user)
                if found is not None:
                    return found[:4] + (path + found[4],)
            elif len(path) < 4 and (user_frame := _view_frame(node, user, node_frame)) is not None:
                pending.append((user, user_frame, path + [user.name]))
    return None


def _view_frame(source: Node, result: Node, frame: Frame) -> Frame | None:
    """The frame of result = a cast, permute or unit-dim reshape of source (whose dims have frame)."""
    if is_real_cast(result):
        return frame
    if result.op == "permute":
        return tuple(frame[k] for k in result.attrs["perm"])
    if result.op == "reshape":
        source_shape, result_shape = static_shape(source), static_shape(result)
        kept_source = [k for k, size in enumerate(source_shape) if size != 1]
        kept_result = [k for k, size in enumerate(result_shape) if size != 1]
        if [source_shape[k] for k in kept_source] != [result_shape[k] for k in kept_result]:
            return None
        viewed = [None] * len(result_shape)
        for k_source, k_result in zip(kept_source, kept_result):
            viewed[k_result] = frame[k_source]
        return tuple(viewed)
    return None


def _matmul_over_time(graph: Graph, states: Node, frame: Frame, product: Node):
    column = graph.node(product.inputs[1])
    state_shape, column_shape = static_shape(states), static_shape(column)
    n = frame[-1]
    if (len(state_shape) != 4 or column.op != "reshape" or column_shape[-1] != 1 or n in (None, TIME)
            or column_shape[-2] != state_shape[-1] or static_shape(product)[:-1] != state_shape[:-1]):
        return None
    c, _ = through_casts(graph, graph.node(column.inputs[0]))
    offset = len(state_shape) - len(column_shape)
    if static_shape(c) != column_shape[:-1] or offset < 0:
        return None
    c_frame = unit_free(c, tuple(frame[offset + k] for k in range(len(column_shape) - 2)) + (n,))
    y, y_frame, nodes = product, frame[:-1] + (None,), [column.name, product.name]
    while (user := sole_user(graph, y)) is not None and user.op in ("reshape", "permute"):
        y, y_frame = user, _view_frame(y, user, y_frame)
        if y_frame is None:
            return None
        nodes.append(y.name)
    if n in y_frame or TIME not in y_frame:
        return None
    return y, y_frame, Leaf(c, c_frame), n, nodes

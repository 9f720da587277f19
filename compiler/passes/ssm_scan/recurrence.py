"""The recurrence step by step: readouts, the unrolled loop, the decode step.

    readout   y = <h, C> over the state dim n, spelled einsum("bdn,bn->bd", h, C),
              matmul(h, C[..., None])[..., 0] (or .squeeze(-1)), or sum(h * C, dim=n)
    loop      h_i = select(Ā, t, i) * h_{i-1} + select(B̄u, t, i), h_{-1} = zeros,
              or Ā_i, B̄u_i discretised in the loop from selects at step i (exp(Δ[:, i] ⊗ A),
              Δ[:, i] ⊗ u[:, i] ⊗ B[:, i]): the same expression every step, its selects lifted
              to the sequences they read
              y_i = readout(h_i, select(C, t', i)), y = stack(y_i) | cat(y_i[..., None])
              | cat(matmul(h_i, C_i[..., None]), dim=-1),
              or the states stacked first and read out at once: y = readout(stack(h_i), C)
    decode    h = exp(Δ ⊗ A) * S + Δ ⊗ B ⊗ x with a carried state S, y = readout(h, C)

A loop is parsed step by step from the stack's inputs, each step compared with the one before
(linear in the graph); a decode step from its state update h.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from compiler.passes import PassContext
from compiler.passes.ssm_scan.frames import (
    TIME, Frame, Leaf, NoMatch, aligned_frame, static_shape, through_casts, under_views, unit_free, view_leaf)
from compiler.passes.ssm_scan.lowering import (
    assign_roles, build_layout, describe, discretisation, find_epilogues, fuse_op, role_labels, sole_user)
from ir.fused import FusedSpec
from ir.graph import Graph, Node
from ir.match import check_private

ZEROS = ("zeros", "new_zeros", "zeros_like")
DECODE_NAMES = {"u": "x", "delta": "dt", "delta_bias": "dt_bias"}
LONG_LOOP = 128  # steps from which an unrolled loop is pointed out in report()
LONG_LOOP_NOTE = ("ssm_scan: TorchDynamo unrolled the {steps}-step scan loop in {where}; capture time grows with "
                  "the number of steps (a few ms per step and layer on a CPU core). "
                  "compiler.register_rolled({function}) keeps it one op at any length (transformers' Mamba "
                  "family and mamba_ssm's selective_scan_ref are rolled by default, unless compiled with "
                  "rolled=False or FLASHFX_ROLLED=0).")
SOURCE_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


@dataclass
class Readout:
    """y = <h, c> over h's dim n; c and y dims given as the dims of h they line up with."""

    state: Node
    c: Node
    c_frame: Frame
    n: int
    y_frame: Frame
    nodes: list[str]
    key: tuple


@dataclass
class Step:
    h: Node
    previous: Node
    a: Node
    bu: Node
    readout: Readout
    nodes: list[str]
    keys: tuple = ()  # per-step discretisation: the keys of Ā_i and B̄u_i (equal across steps)


def find_readout(graph: Graph, y: Node) -> Readout | None:
    """y as a contraction of a state h (an add of rank 3) with C over one dim of h, or None."""
    base, casts = through_casts(graph, y)
    if base.op == "einsum" and len(base.inputs) == 2:
        found = _einsum_readout(graph, base)
    elif base.op in ("select", "reshape", "matmul") and base.inputs:
        found = _matmul_readout(graph, base)
    elif base.op == "sum":
        found = _sum_readout(graph, base)
    else:
        return None
    if found is not None:
        found.nodes += casts[::-1]
        found.key += tuple(str(graph.node(name).type.dtype) for name in casts)
    return found


def is_state(node: Node) -> bool:
    return node.op == "add" and node.type is not None and node.type.rank == 3


def _einsum_readout(graph: Graph, node: Node) -> Readout | None:
    if "->" not in node.attrs["equation"]:
        return None
    terms, out = node.attrs["equation"].split("->")
    terms = terms.split(",")
    for h_side in (0, 1):
        h, h_casts = through_casts(graph, graph.node(node.inputs[h_side]))
        c, c_casts = through_casts(graph, graph.node(node.inputs[1 - h_side]))
        p, q = terms[h_side], terms[1 - h_side]
        contracted = [index for index in p if index in q and index not in out]
        if (not is_state(h) or len(p) != 3 or len(contracted) != 1 or set(q) - set(p) or len(set(p)) != 3
                or sorted(out) != sorted(set(p) - set(contracted))):
            continue
        return Readout(h, c, unit_free(c, tuple(p.index(index) for index in q)), p.index(contracted[0]),
                       tuple(p.index(index) for index in out), h_casts[::-1] + c_casts[::-1] + [node.name],
                       ("einsum", node.attrs["equation"], h_side))
    return None


def _matmul_readout(graph: Graph, node: Node) -> Readout | None:
    """matmul(h, C_i[..., None]) then [..., 0] or .squeeze(-1): h is a batch (its first dim) of
    (d, n) matrices, C_i a column per batch element (or one shared column). The matmul alone,
    its (b, d, 1) result unsqueezed, when the steps are concatenated along that last dim."""
    product, wrappers = (node, []) if node.op == "matmul" else (graph.node(node.inputs[0]), [node.name])
    if product.op != "matmul" or (wrappers and static_shape(node) + (1,) != static_shape(product)):
        return None
    if node.op == "select" and node.attrs["dim"] != len(static_shape(product)) - 1:
        return None
    h, h_casts = through_casts(graph, graph.node(product.inputs[0]))
    column = graph.node(product.inputs[1])
    if not is_state(h) or column.op != "reshape" or static_shape(product) != static_shape(h)[:-1] + (1,):
        return None
    c, c_casts = through_casts(graph, graph.node(column.inputs[0]))
    c_shape = static_shape(c)
    if static_shape(column) != c_shape + (1,) or len(c_shape) not in (1, 2) or c_shape[-1] != static_shape(h)[-1]:
        return None
    c_frame = (0, 2) if len(c_shape) == 2 else (2,)
    return Readout(h, c, unit_free(c, c_frame), 2, (0, 1), h_casts[::-1] + c_casts[::-1] + [column.name, product.name]
                   + wrappers, ("matmul", node.op, len(c_shape)))


def _sum_readout(graph: Graph, node: Node) -> Readout | None:
    """sum(h * C_i, dim=n) with C_i broadcast against h."""
    dims, product = node.attrs["dim"], graph.node(node.inputs[0])
    if node.attrs["keepdim"] or node.attrs["dtype"] is not None or len(dims) != 1 or product.op != "mul":
        return None
    if product.attrs["scalar"] is not None or len(product.inputs) != 2:
        return None
    for h_side in (0, 1):
        h, h_casts = through_casts(graph, graph.node(product.inputs[h_side]))
        other = graph.node(product.inputs[1 - h_side])
        frame = aligned_frame(other, product, (0, 1, 2)) if is_state(h) and static_shape(h) == static_shape(product) else None
        if frame is None:
            continue
        c, through = view_leaf(graph, other, frame)
        n = dims[0]
        return Readout(h, c.node, c.frame, n, tuple(k for k in range(3) if k != n),
                       h_casts[::-1] + through + [product.name, node.name], ("sum", h_side, n))
    return None


def _reads_out_steps(graph: Graph, anchor: Node) -> bool:
    """Does a stack with symbolic sizes look like a scan's per-step readouts?"""
    try:
        ys, _, _ = _stacked(graph, anchor)
        return bool(ys) and find_readout(graph, ys[0]) is not None
    except NoMatch:
        return True


def fuse_loop(graph: Graph, anchor: Node, context: PassContext) -> None:
    if anchor.type is None:
        return
    if anchor.type.static_shape() is None:
        if _reads_out_steps(graph, anchor):
            raise NoMatch(anchor, "sizes are symbolic (dynamic shapes): re-rolling needs static sizes")
        return
    ys, time_dim, wrappers = _stacked(graph, anchor)
    if ys and find_readout(graph, ys[0]) is not None:
        parse = _read_out_per_step
    elif ys and is_state(ys[0]) and _recurrence(graph, ys[0], 0, None) is not None:
        parse = _read_out_after_stack
    else:
        return
    _note_long_loop(context, anchor, len(ys))
    loop = parse(graph, anchor, ys, time_dim, wrappers)
    _check_initial_state(graph, loop.steps[0])
    _check_private(graph, loop.steps, loop.inside)
    lift = functools.partial(_lifted, graph) if loop.per_step else None
    core = discretisation(graph, loop.a, loop.bu, loop.c, loop.n, lift)
    inner = [leaf.node.name for leaf in (core.delta, core.A, *core.pair) if leaf.node.name in loop.inside]
    if inner:
        raise NoMatch(graph.node(inner[0]), "a factor of Ā or B̄u is computed in the loop, not read at step i")
    plan = assign_roles(graph, core, find_epilogues(graph, loop.y, unit_free(loop.y, loop.y_frame)))
    last_h = loop.steps[-1].h
    state = last_h if any(user.name not in loop.inside for user in graph.users(last_h.name)) else None
    layout = build_layout(plan, Leaf(last_h, (0, 1, 2)), state, seqlen=len(loop.steps))
    replaced = loop.nodes + plan.epilogue.nodes
    detail = f"unrolled loop{loop.form}, L={len(loop.steps)}, {describe(layout, plan.groups)}"
    fuse_op(graph, context, plan, FusedSpec("ssm_scan", dict(layout=layout)), detail, replaced, state, loop.inside)


def _note_long_loop(context: PassContext, anchor: Node, steps: int) -> None:
    """Point out a long loop Dynamo unrolled (fused or not), naming the function that gathers its steps."""
    if steps < LONG_LOOP:
        return
    trace = anchor.fx_node.meta.get("stack_trace", "") if anchor.fx_node is not None else ""
    found = SOURCE_LINE.findall(trace)
    path, line, function = found[-1] if found else ("", "", "")
    where = f"{function} ({os.path.basename(path)}:{line})" if found else "the model"
    note = LONG_LOOP_NOTE.format(steps=steps, where=where, function=function or "scan_fn")
    if note not in context.report.notes:
        context.report.notes.append(note)


@dataclass
class Loop:
    """A parsed loop: its steps, the sequences of the recurrence, and y before the epilogue."""

    steps: list[Step]
    a: Leaf
    bu: Leaf
    c: Leaf
    n: int
    y: Node
    y_frame: Frame
    nodes: list[str]  # everything the op replaces up to y, in order
    inside: set[str]
    form: str = ""
    per_step: bool = False  # Ā and B̄u discretised in the loop: their factors are lifted selects


def _read_out_per_step(graph: Graph, anchor: Node, ys: list[Node], time_dim: int, wrappers: list[str]) -> Loop:
    """y_i = <h_i, C_i> inside the loop, y = stack(y_i) (selective_scan_ref, Hugging Face)."""
    steps = _steps(graph, ys)
    first = steps[0]
    nodes = [name for step in steps for name in step.nodes] + wrappers + [anchor.name]
    y_frame = first.readout.y_frame[:time_dim] + (TIME,) + first.readout.y_frame[time_dim:]
    if first.keys:
        a, bu = Leaf(first.a, unit_free(first.a, (0, 1, 2))), Leaf(first.bu, unit_free(first.bu, (0, 1, 2)))
    else:
        a, bu = _sequence(graph, first.a, TIME), _sequence(graph, first.bu, TIME)
    return Loop(steps, a, bu, _c_sequence(graph, first.readout), first.readout.n, anchor, y_frame, nodes, set(nodes),
                per_step=bool(first.keys))


def _read_out_after_stack(graph: Graph, anchor: Node, hs: list[Node], time_dim: int, wrappers: list[str]) -> Loop:
    """hs = stack(h_i), then y = <hs, C> over the state dim (mamba.py's selective_scan_seq)."""
    steps, previous = [], None
    for i, h in enumerate(hs):
        found = _recurrence(graph, h, i, previous)
        if found is None:
            raise NoMatch(h, f"step {i}: state is not select(Ā, t, {i}) * h_{{i-1}} + select(B̄u, t, {i})")
        mul, a, before, bu = found
        steps.append(Step(h, before, a, bu, None, [a.name, bu.name, mul.name, h.name]))
        if i and (a.inputs[0], bu.inputs[0]) != (steps[0].a.inputs[0], steps[0].bu.inputs[0]):
            raise NoMatch(a, f"step {i} reads Ā or B̄u from another sequence than step 0")
        previous = h
    frame = (0, 1, 2)[:time_dim] + (TIME,) + (0, 1, 2)[time_dim:]
    readout = _stacked_readout(graph, anchor, frame)
    if readout is None:
        raise NoMatch(anchor, "the stacked states are not contracted with C over the state dim")
    y, c, n, y_frame, readout_nodes = readout
    nodes = [name for step in steps for name in step.nodes] + wrappers + [anchor.name] + readout_nodes
    first = steps[0]
    return Loop(steps, _sequence(graph, first.a, TIME), _sequence(graph, first.bu, TIME),
                c, n, y, y_frame, nodes, set(nodes), form=" of stacked states")


def _stacked_readout(graph: Graph, stacked: Node, frame: Frame):
    """(y, C leaf, n, y frame, nodes) for y = <stacked, C> over one state dim, spelled
    einsum("bldn,bln->bld", hs, C), (hs @ C[..., None])[..., 0] or sum(hs * C[..., None, :], n)."""
    user, nodes = stacked, []
    while (next_user := sole_user(graph, user)) is not None and next_user.op in ("cast", "identity"):
        user, nodes = next_user, nodes + [next_user.name]
    user = sole_user(graph, user)
    if user is None or len(user.inputs) != 2:
        return None
    states_side = 0 if user.inputs[0] == (nodes[-1] if nodes else stacked.name) else 1
    other = graph.node(user.inputs[1 - states_side])
    if user.op == "einsum":
        found = _stacked_einsum(graph, user, other, states_side, frame)
    elif user.op == "matmul" and states_side == 0:
        found = _stacked_matmul(graph, user, other, frame)
    elif user.op == "mul" and user.attrs["scalar"] is None:
        found = _stacked_sum(graph, user, other, frame)
    else:
        found = None
    if found is None:
        return None
    y, c, n, y_frame, readout_nodes = found
    return y, c, n, y_frame, nodes + readout_nodes


def _stacked_einsum(graph: Graph, node: Node, other: Node, states_side: int, frame: Frame):
    if "->" not in node.attrs["equation"]:
        return None
    terms, out = node.attrs["equation"].split("->")
    terms = terms.split(",")
    p, q = terms[states_side], terms[1 - states_side]
    contracted = [index for index in p if index in q and index not in out]
    if (len(p) != 4 or len(set(p)) != 4 or len(contracted) != 1 or set(q) - set(p)
            or sorted(out) != sorted(set(p) - set(contracted))):
        return None
    position = dict(zip(p, frame))
    if position[contracted[0]] == TIME:
        return None
    c, through = view_leaf(graph, other, tuple(position[index] for index in q))
    return node, c, position[contracted[0]], unit_free(node, tuple(position[index] for index in out)), through + [node.name]


def _stacked_matmul(graph: Graph, product: Node, column: Node, frame: Frame):
    after = sole_user(graph, product)
    if after is None or after.op not in ("reshape", "select") or static_shape(after) + (1,) != static_shape(product):
        return None
    if after.op == "select" and after.attrs["dim"] != len(static_shape(product)) - 1:
        return None
    column_shape, batch = static_shape(column), frame[:-2]
    if len(column_shape) < 2 or column_shape[-1] != 1 or len(column_shape) - 2 > len(batch):
        return None
    column_frame = batch[len(batch) - (len(column_shape) - 2):] + (frame[-1], None)
    c, through = view_leaf(graph, column, unit_free(column, column_frame))
    return after, c, frame[-1], unit_free(after, frame[:-1]), through + [product.name, after.name]


def _stacked_sum(graph: Graph, product: Node, other: Node, frame: Frame):
    reduction = sole_user(graph, product)
    if reduction is None or reduction.op != "sum" or reduction.attrs["keepdim"] or reduction.attrs["dtype"] is not None:
        return None
    if len(reduction.attrs["dim"]) != 1 or len(static_shape(product)) != len(frame):
        return None
    dim = reduction.attrs["dim"][0]
    other_frame = aligned_frame(other, product, frame)
    if other_frame is None or frame[dim] == TIME:
        return None
    c, through = view_leaf(graph, other, other_frame)
    y_frame = frame[:dim] + frame[dim + 1:]
    return reduction, c, frame[dim], unit_free(reduction, y_frame), through + [product.name, reduction.name]


def _stacked(graph: Graph, anchor: Node) -> tuple[list[Node], int, list[str]]:
    """(y_0..y_{L-1}, the time dim of the result, the unsqueezes between them and a cat)."""
    parts = [graph.node(name) for name in anchor.inputs]
    dim = anchor.attrs["dim"]
    if anchor.op == "stack":
        return parts, dim, []
    ys, wrappers = [], []
    for part in parts:
        shape = static_shape(part)
        if part.op == "matmul" and shape[dim] == 1 and dim in (-1, len(shape) - 1):
            ys.append(part)  # matmul(h, C_i[..., None]) kept (b, d, 1): its unit dim is time
            continue
        if part.op != "reshape" or shape[dim] != 1 or static_shape(graph.node(part.inputs[0])) != shape[:dim] + shape[dim + 1:]:
            return [], dim, []
        ys.append(graph.node(part.inputs[0]))
        wrappers.append(part.name)
    return ys, dim, wrappers


def _steps(graph: Graph, ys: list[Node]) -> list[Step]:
    steps: list[Step] = []
    for i, y in enumerate(ys):
        step = _step(graph, y, i, steps[-1].h if steps else None)
        if steps:
            _check_same_shape(graph, steps[0], step, i)
        steps.append(step)
    return steps


def _step(graph: Graph, y: Node, i: int, previous: Node | None) -> Step:
    readout = find_readout(graph, y)
    if readout is None:
        raise NoMatch(y, f"step {i}: the output is not a contraction <h, C> over the state")
    h = readout.state
    found = _recurrence(graph, h, i, previous)
    if found is None:
        expected = "h_{i-1}" if previous is None else previous.name
        raise NoMatch(h, f"step {i}: state is not select(Ā, t, {i}) * {expected} + select(B̄u, t, {i})")
    mul, a, before, bu = found
    c = readout.c
    if c.op != "select" or c.attrs["index"] != i:
        raise NoMatch(c, f"step {i}: C is not read at time {i} (select(C, t, {i}))")
    nodes = [a.name, bu.name, mul.name, h.name, c.name] + readout.nodes
    if _is_select(a, i) and _is_select(bu, i):
        return Step(h, before, a, bu, readout, nodes)
    (a_key, a_nodes), (bu_key, bu_nodes) = _step_expression(graph, a, i), _step_expression(graph, bu, i)
    return Step(h, before, a, bu, readout, a_nodes + bu_nodes + nodes[2:], (a_key, bu_key))


def _is_select(node: Node, index: int) -> bool:
    return node.op == "select" and node.attrs["index"] == index


STEP_OPS = {"mul", "exp", "reshape", "expand", "permute", "cast", "identity"}  # what a step may discretise with


def _step_expression(graph: Graph, node: Node, i: int):
    """node as a product (exp, views) of selects at step i and tensors from before the loop: (a key
    that is the same at every step, the nodes it is made of, node last); None for anything else, or
    when no select at step i is in it (it is then a tensor from before the loop, a leaf).
    A part may be shared with the other expression or the readout (d = Δ[:, i, None] read twice):
    check_private keeps readers outside the loop away."""
    if node.op == "select":
        return (("select", node.inputs[0], node.attrs["dim"]), [node.name]) if node.attrs["index"] == i else None
    if node.op not in STEP_OPS or not node.inputs:
        return None
    keys, nodes = [], []
    for name in node.inputs:
        if not _reads_a_select(graph, graph.node(name), i):
            keys.append((name,))
            continue
        found = _step_expression(graph, graph.node(name), i)
        if found is None:
            return None
        keys.append(found[0])
        nodes += found[1]
    return (node.op, repr(sorted(node.attrs.items())), tuple(keys)), nodes + [node.name]


def _reads_a_select(graph: Graph, node: Node, i: int) -> bool:
    """Is a select at index i among node and the STEP_OPS chains under it (it varies by step)?"""
    if node.op == "select":
        return node.attrs["index"] == i
    return node.op in STEP_OPS and any(_reads_a_select(graph, graph.node(name), i) for name in node.inputs)


def _per_step(graph: Graph, node: Node, i: int) -> bool:
    """Is node Ā_i or B̄u_i: a select at step i, or an expression of selects at step i?"""
    return _is_select(node, i) or (_reads_a_select(graph, node, i) and _step_expression(graph, node, i) is not None)


def _lifted(graph: Graph, leaf: Leaf) -> Leaf:
    """A factor of step 0's Ā_0 or B̄u_0 as the op reads it: a select at step 0 (under views) is its
    sequence."""
    selected = under_views(graph, leaf)
    if selected.node.op != "select" or selected.node.attrs["index"] != 0:
        return leaf
    dim = selected.node.attrs["dim"]
    source = graph.node(selected.node.inputs[0])
    return Leaf(source, unit_free(source, selected.frame[:dim] + (TIME,) + selected.frame[dim:]))


def _recurrence(graph: Graph, h: Node, i: int, previous: Node | None):
    """(mul, select(Ā, t, i), h_{i-1}, select(B̄u, t, i)) when h = Ā_i * h_{i-1} + B̄u_i, else None."""
    if h.attrs["scalar"] is not None or len(h.inputs) != 2:
        return None
    for mul_name, bu_name in (h.inputs, h.inputs[::-1]):
        mul, bu = graph.node(mul_name), graph.node(bu_name)
        if not (mul.op == "mul" and mul.attrs["scalar"] is None and len(mul.inputs) == 2):
            continue
        for a_name, before_name in (mul.inputs, mul.inputs[::-1]):
            a, before = graph.node(a_name), graph.node(before_name)
            if (_per_step(graph, a, i) and _per_step(graph, bu, i) and (previous is None or before is previous)
                    and static_shape(a) == static_shape(h) == static_shape(bu)):
                return mul, a, before, bu
    return None


def _check_same_shape(graph: Graph, first: Step, step: Step, i: int) -> None:
    """Step i reads the same sequences, along the same dims, spelled the same way, as step 0."""
    if step.keys != first.keys:
        raise NoMatch(step.a, f"step {i} discretises Ā or B̄u differently from step 0")
    pairs = () if first.keys else (("Ā", step.a, first.a), ("B̄u", step.bu, first.bu))
    for name, ours, theirs in pairs + (("C", step.readout.c, first.readout.c),):
        if ours.inputs[0] != theirs.inputs[0] or ours.attrs["dim"] != theirs.attrs["dim"]:
            raise NoMatch(ours, f"step {i} reads {name} from {ours.inputs[0]} (dim {ours.attrs['dim']}), "
                                f"step 0 from {theirs.inputs[0]} (dim {theirs.attrs['dim']})")
    if step.readout.key != first.readout.key:
        raise NoMatch(graph.node(step.readout.nodes[-1]), f"step {i} computes y differently from step 0 "
                                                          f"({step.readout.key} vs {first.readout.key})")


def _check_initial_state(graph: Graph, first: Step) -> None:
    start, _ = through_casts(graph, first.previous)
    if start.op == "torch" and start.attrs["target"] in ZEROS and static_shape(start) == static_shape(first.h):
        return
    raise NoMatch(start, "the initial state is not zeros: a carried state the scan kernel cannot take")


def _check_private(graph: Graph, steps: list[Step], inside: set[str]) -> None:
    """Nothing outside the loop may read a step's intermediates; the last state may be read."""
    for i, step in enumerate(steps):
        check_private(graph, [name for name in step.nodes if name != steps[-1].h.name], inside,
                      f"step {i}'s {{name}} is also read by {{reader}} outside the scan")


def _sequence(graph: Graph, select: Node, time: int) -> Leaf:
    """The sequence a per-step select reads, with its dims in the frame of h (plus time)."""
    dim = select.attrs["dim"]
    frame = tuple(range(3))
    return Leaf(graph.node(select.inputs[0]), frame[:dim] + (time,) + frame[dim:])


def _c_sequence(graph: Graph, readout: Readout) -> Leaf:
    dim = readout.c.attrs["dim"]
    return Leaf(graph.node(readout.c.inputs[0]), readout.c_frame[:dim] + (TIME,) + readout.c_frame[dim:])


def fuse_decode(graph: Graph, h: Node, context: PassContext) -> None:
    found = _carried_recurrence(graph, h)
    readout_at = _readout_of(graph, h) if found is not None else None
    if readout_at is None:
        return
    mul, decay, carried, update = found
    y, readout = readout_at
    frame = (0, 1, 2)
    state, _ = view_leaf(graph, carried, aligned_frame(carried, mul, frame))
    core = discretisation(graph, Leaf(decay, aligned_frame(decay, mul, frame)), Leaf(update, aligned_frame(update, h, frame)),
                          Leaf(readout.c, readout.c_frame), readout.n)
    plan = assign_roles(graph, core, find_epilogues(graph, y, unit_free(y, readout.y_frame)))
    plan.operands = [("state", state, role_labels(state, plan.roles))] + [
        (DECODE_NAMES.get(name, name), leaf, labels) for name, leaf, labels in plan.operands]
    inside = {h.name, mul.name, *readout.nodes, *plan.epilogue.nodes, plan.epilogue.anchor.name}
    layout = build_layout(plan, Leaf(h, (0, 1, 2)), h, seqlen=1)
    replaced = [mul.name, h.name] + readout.nodes + plan.epilogue.nodes
    spec = FusedSpec("ssm_scan", dict(layout=layout), op="ssm_state_update")
    fuse_op(graph, context, plan, spec, f"decode step, {describe(layout, plan.groups)}", replaced, h, inside)


def _carried_recurrence(graph: Graph, h: Node):
    """(mul, exp(Δ ⊗ A), S, Δ ⊗ B ⊗ x) when h = exp(Δ ⊗ A) * S + Δ ⊗ B ⊗ x; else None."""
    if not is_state(h) or h.type.static_shape() is None or h.attrs["scalar"] is not None or len(h.inputs) != 2:
        return None
    for mul_name, update_name in (h.inputs, h.inputs[::-1]):
        mul, update = graph.node(mul_name), graph.node(update_name)
        if (mul.op != "mul" or mul.attrs["scalar"] is not None or len(mul.inputs) != 2
                or static_shape(mul) != static_shape(h) or aligned_frame(update, h, (0, 1, 2)) is None):
            continue
        for decay_name, carried_name in (mul.inputs, mul.inputs[::-1]):
            if through_casts(graph, graph.node(decay_name))[0].op == "exp":
                return mul, graph.node(decay_name), graph.node(carried_name), update
    return None


def _readout_of(graph: Graph, h: Node) -> tuple[Node, Readout] | None:
    """The readout of state h among the nodes at most four reads downstream of it."""
    frontier = [h]
    for _ in range(4):
        frontier = [user for node in frontier for user in graph.users(node.name)]
        for candidate in frontier:
            readout = find_readout(graph, candidate) if candidate.op in ("einsum", "select", "reshape", "sum") else None
            if readout is not None and readout.state is h:
                return candidate, readout
    return None

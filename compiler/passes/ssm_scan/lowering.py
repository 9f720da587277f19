"""From a recognised recurrence to a fused op: discretisation, epilogue, roles, layout.

    discretisation   Δ, A from Ā = exp(Δ ⊗ A) (Δ: the factor Ā and B̄u share), {u, B} from
                     B̄u = Δ ⊗ B ⊗ u, then Δ = softplus(Δ' + delta_bias) folded where present
    epilogue         out = (y + u * D) * silu(z), casts after each part, each part optional
    roles            n is the dim the readout contracts; b, d are the assignment of h's other two
                     dims (and u vs B) under which every operand has the dims it may have
                     (A: d, n; u, Δ, z: b, d, l; D, delta_bias: d; B, C: b, n, l and per-group
                     channels through repeat_interleave / repeat_kv). Where two assignments fit
                     the data is symmetric in them and either is right.
    layout, fuse     the op's operands with role labels (the runtime op views them at run
                     time), eager's output shape and dtype, the final state when it is read.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field, replace

import torch

from compiler.passes import PassContext
from compiler.passes.ssm_scan.frames import (
    TIME, Frame, Leaf, NoMatch, REAL, aligned_frame, factor_leaves, is_real_cast, static_shape, through_casts,
    under_views, unit_free, view_leaf)
from ir.graph import Call, Graph, Node, Ref
from ir.fused import FusedSpec, Operand, Result, SSMLayout

SCAN_ROLES = {"u": "bdl", "delta": "bdl", "z": "bdl", "A": "dn", "D": "d", "delta_bias": "d"}


@dataclass
class Core:
    """The recurrence's inputs before roles are known: Δ, A, {u, B} (order open), C."""

    delta: Leaf
    A: Leaf
    pair: tuple[Leaf, Leaf]
    C: Leaf
    n: int


@dataclass
class Epilogue:
    """The nodes after y up to the anchor; the anchor has y's shape and dims (`frame`)."""

    anchor: Node
    frame: Frame
    nodes: list[str] = field(default_factory=list)
    skip: tuple[Leaf, Leaf] | None = None
    gate: Leaf | None = None


@dataclass
class Plan:
    """Roles assigned: the fused op's operands and outputs."""

    operands: list[tuple[str, Leaf, tuple]]  # (argument, leaf, role labels)
    roles: dict[int, str]
    epilogue: Epilogue
    groups: int
    softplus: bool


def discretisation(graph: Graph, decay: Leaf, update: Leaf, c_sequence: Leaf, n: int, lift=None) -> Core:
    """Δ and A from Ā = exp(Δ ⊗ A), {u, B} from B̄u = Δ ⊗ B ⊗ u, and C; `lift` maps the factors of
    one step's Ā and B̄u to the sequences they are read from (a loop that discretises per step)."""
    exp, _ = through_casts(graph, decay.node)
    if exp.op != "exp":
        raise NoMatch(exp, f"Ā is {exp.op}, not exp(Δ ⊗ A)")
    decay_leaves, _ = factor_leaves(graph, graph.node(exp.inputs[0]), decay.frame)
    update_leaves, through = factor_leaves(graph, update.node, update.frame)
    if lift is not None:
        decay_leaves, update_leaves, through = [lift(leaf) for leaf in decay_leaves], \
            [lift(leaf) for leaf in update_leaves], []
    shared = [leaf for leaf in decay_leaves if any(leaf.same(other) for other in update_leaves)]
    if len(decay_leaves) != 2 or not shared:
        raise NoMatch(exp, f"Ā is not exp(Δ ⊗ A) with Δ shared with B̄u: its factors are "
                           f"{[leaf.node.name for leaf in decay_leaves]}")
    delta = shared[0]
    A = next(leaf for leaf in decay_leaves if leaf is not delta)
    rest = _other_factors(update_leaves, delta)
    if len(rest) > 2:
        rest = _grouped_b(graph, update, delta, through, n) or rest
    if len(rest) != 2:
        raise NoMatch(update.node, f"B̄u is not Δ ⊗ B ⊗ u: its factors are {[leaf.node.name for leaf in update_leaves]}")
    C, _ = view_leaf(graph, c_sequence.node, c_sequence.frame)
    return Core(delta, A, (rest[0], rest[1]), C, n)


def _other_factors(leaves: list[Leaf], delta: Leaf) -> list[Leaf]:
    """The factors of B̄u besides Δ."""
    rest = list(leaves)
    shared = next((leaf for leaf in rest if leaf.same(delta)), None)
    if shared is not None:
        rest.remove(shared)
    return rest


def _grouped_b(graph: Graph, update: Leaf, delta: Leaf, through: list[str], n: int) -> list[Leaf] | None:
    """[B, u] when a product among B̄u's factors is B as the graph computes it, along the state dim
    n (FalconMamba's RMS-normalised B * rsqrt(mean(B^2) + eps)); None when none is."""
    for product in (name for name in through if graph.node(name).op == "mul"):
        leaves, _ = factor_leaves(graph, update.node, update.frame, keep=frozenset({product}))
        rest = _other_factors(leaves, delta)
        if len(rest) == 2 and sum(n in leaf.frame for leaf in rest) == 1:
            return rest
    return None


def find_epilogues(graph: Graph, y: Node, frame: Frame) -> list[Epilogue]:
    """The ways the epilogue after y may end, longest first: y (+ u * D) (* silu(z)), casts after each."""
    current, nodes = _casts_after(graph, y, [])
    found = [Epilogue(current, frame, nodes)]
    skip = _skip_after(graph, current, frame)
    if skip is not None:
        current, skip_nodes, leaves = skip
        current, nodes = _casts_after(graph, current, nodes + skip_nodes)
        found.append(Epilogue(current, frame, nodes, skip=leaves))
    gate = _gate_after(graph, current, frame)
    if gate is not None:
        current, gate_nodes, z = gate
        current, nodes = _casts_after(graph, current, nodes + gate_nodes)
        found.append(replace(found[-1], anchor=current, nodes=nodes, gate=z))
    return found[::-1]


def sole_user(graph: Graph, node: Node) -> Node | None:
    users = graph.users(node.name)
    return users[0] if len(users) == 1 else None


def _casts_after(graph: Graph, node: Node, nodes: list[str]) -> tuple[Node, list[str]]:
    user = sole_user(graph, node)
    while user is not None and is_real_cast(user):
        node, nodes = user, nodes + [user.name]
        user = sole_user(graph, node)
    return node, nodes


def _binary_user(graph: Graph, node: Node, op: str) -> tuple[Node, Node] | None:
    """(user, its other input) when node's only reader is `op`(node, other) of node's shape."""
    user = sole_user(graph, node)
    if user is None or user.op != op or user.attrs["scalar"] is not None or len(user.inputs) != 2:
        return None
    if node.name not in user.inputs or static_shape(user) != static_shape(node):
        return None
    other = user.inputs[1] if user.inputs[0] == node.name else user.inputs[0]
    return user, graph.node(other)


def _skip_after(graph: Graph, y: Node, frame: Frame):
    found = _binary_user(graph, y, "add")
    if found is None:
        return None
    add, other = found
    other_frame = aligned_frame(other, add, frame)
    if other_frame is None:
        return None
    leaves, through = factor_leaves(graph, other, other_frame)
    return (add, through + [add.name], (leaves[0], leaves[1])) if len(leaves) == 2 else None


def _gate_after(graph: Graph, y: Node, frame: Frame):
    found = _binary_user(graph, y, "mul")
    if found is None:
        return None
    mul, other = found
    silu, casts = through_casts(graph, other)
    other_frame = aligned_frame(other, mul, frame)
    if silu.op != "silu" or other_frame is None:
        return None
    z, through = view_leaf(graph, graph.node(silu.inputs[0]), other_frame)
    return mul, through + [silu.name] + casts[::-1] + [mul.name], z


def role_labels(leaf: Leaf, roles: dict[int, str]) -> tuple:
    return tuple(None if position is None else roles[position] for position in leaf.frame)


def _fits(leaf: Leaf, roles: dict[int, str], allowed: str) -> bool:
    return all(label is None or label in allowed for label in role_labels(leaf, roles))


def assign_roles(graph: Graph, core: Core, epilogues: list[Epilogue]) -> Plan:
    """The first (epilogue, roles, {u, B}) combination under which every operand fits its roles."""
    others = [k for k in range(3) if k != core.n]
    for epilogue in epilogues:
        for (b, d), (u, B) in itertools.product((others, others[::-1]), (core.pair, core.pair[::-1])):
            roles = {b: "b", d: "d", core.n: "n", TIME: "l"}
            plan = _try_plan(graph, core, epilogue, roles, u, B)
            if plan is not None:
                return plan
    raise NoMatch(core.A.node, "no assignment of batch/channel/state dims fits the operands: A must be "
                               "(channels, state), u and Δ (batch, channels, time), B and C (batch, state, time)")


def _try_plan(graph: Graph, core: Core, epilogue: Epilogue, roles, u: Leaf, B: Leaf) -> Plan | None:
    named = {"u": u, "delta": core.delta, "A": core.A}
    if epilogue.skip is not None:
        if not any(leaf.same(u) for leaf in epilogue.skip):
            return None
        named["D"] = next(leaf for leaf in epilogue.skip if not leaf.same(u))
    if epilogue.gate is not None:
        named["z"] = epilogue.gate
    if not all(_fits(leaf, roles, SCAN_ROLES[name]) for name, leaf in named.items()):
        return None
    grouped = [_grouping(graph, leaf, roles) for leaf in (B, core.C)]
    if not all(_fits(leaf, {**roles, "g": "g"}, "bnlg") for leaf, _ in grouped):
        return None
    groups = {g for _, g in grouped if g > 1} or {1}
    if len(groups) != 1:
        return None
    named["delta"], softplus, bias = _fold_delta(graph, core.delta, roles)
    if bias is not None:
        named["delta_bias"] = bias
    operands = [(name, _source(graph, leaf), role_labels(leaf, roles)) for name, leaf in named.items()]
    operands += [(name, _source(graph, leaf), role_labels(leaf, {**roles, "g": "g"}))
                 for name, (leaf, _) in zip("BC", grouped)]
    return Plan(operands, roles, epilogue, groups.pop(), softplus)


def _grouping(graph: Graph, leaf: Leaf, roles) -> tuple[Leaf, int]:
    """B or C with its channel dim relabelled as groups: through repeat_interleave / repeat_kv
    (channel c reads group c // (d // g)), or one group per channel when it varies per channel."""
    labels = role_labels(leaf, roles)
    if "d" not in labels:
        return leaf, 1
    dim = labels.index("d")
    node = leaf.node
    repeated = ((node.op == "repeat_kv" and dim == 1)
                or (node.op == "repeat_interleave" and node.attrs["dim"] == dim))
    source = graph.node(node.inputs[0]) if repeated else node
    groups = static_shape(source)[dim]
    frame = list(leaf.frame)
    frame[dim] = "g" if groups > 1 else None
    return Leaf(source, tuple(frame)), groups


def _fold_delta(graph: Graph, delta: Leaf, roles) -> tuple[Leaf, bool, Leaf | None]:
    """Δ' and delta_bias from Δ = softplus(Δ' + delta_bias), each part optional, through casts and
    views (read by others or not: what is folded is computed again in the kernel)."""
    found = under_views(graph, delta)
    softplus = found.node.op == "softplus" and found.node.attrs["beta"] == 1 and found.node.attrs["threshold"] == 20
    if softplus:
        found = under_views(graph, Leaf(graph.node(found.node.inputs[0]), found.frame))
    add = found.node
    if add.op == "add" and add.attrs["scalar"] is None and len(add.inputs) == 2:
        for raw, bias in itertools.permutations(graph.node(name) for name in add.inputs):
            bias_frame = aligned_frame(bias, add, found.frame)
            if static_shape(raw) != static_shape(add) or bias_frame is None:
                continue
            bias_leaf = under_views(graph, Leaf(bias, bias_frame))
            if _fits(bias_leaf, roles, "d"):
                return Leaf(raw, found.frame), softplus, bias_leaf
    return (found if softplus else delta), softplus, None


def _source(graph: Graph, leaf: Leaf) -> Leaf:
    """The tensor under exact up-casts (fp16/bf16 -> fp32) and copies: the kernel reads any dtype."""
    node = leaf.node
    while is_real_cast(node):
        source = graph.node(node.inputs[0])
        exact = node.op == "identity" or (source.type.dtype in (torch.float16, torch.bfloat16)
                                          and node.type.dtype == torch.float32)
        if not exact:
            break
        node = source
    return Leaf(node, leaf.frame)


def build_layout(plan: Plan, states: Leaf, state: Node | None, seqlen: int) -> SSMLayout:
    """The op's layout; `states` is a tensor laid out along the state's dims (and time) giving
    the sizes, `state` the final state when the graph reads it."""
    sizes = dict(b=1, d=1, n=1, l=seqlen, g=plan.groups)
    sizes.update((plan.roles[p], size) for p, size in zip(states.frame, static_shape(states.node)) if p is not None)
    operands = []
    for name, leaf, labels in plan.operands:
        if leaf.node.type.dtype not in REAL:
            raise NoMatch(leaf.node, f"{name} has dtype {leaf.node.type.dtype}: the scan kernels are real-only")
        operands.append(Operand(name, labels))
    anchor = plan.epilogue.anchor
    out = Result(role_labels(Leaf(anchor, plan.epilogue.frame), plan.roles), static_shape(anchor), anchor.type.dtype)
    state_result = None if state is None else Result(role_labels(Leaf(state, unit_free(state, (0, 1, 2))), plan.roles),
                                                     static_shape(state), state.type.dtype)
    return SSMLayout(tuple(operands), tuple(sizes.items()), out, state_result, plan.softplus)


def describe(layout: SSMLayout, groups: int) -> str:
    sizes = dict(layout.sizes)
    parts = [f"b={sizes['b']} d={sizes['d']} n={sizes['n']}"]
    parts += ["softplus"] if layout.softplus else []
    parts += [name for name in ("delta_bias", "dt_bias", "D", "z") if layout.has(name)]
    parts += [f"{groups} groups of B, C"] if groups > 1 else []
    parts += ["final state"] if layout.state is not None else []
    return ", ".join(parts)


def fuse_op(graph: Graph, context: PassContext, plan: Plan, spec: FusedSpec, detail: str, replaced: list[str],
            state: Node | None, inside: set[str]) -> None:
    """Replace the anchor by the op; with a final state, the op returns (out, state) and the
    state's readers outside the pattern read it from there."""
    anchor = plan.epilogue.anchor
    inputs = [leaf.node.name for _, leaf, _ in plan.operands]
    fused = context.fuse(graph, anchor, spec, inputs, replaced, detail)
    if spec.params["layout"].state is None:
        return
    fused.type, fused.value = None, (anchor.value, state.value)
    graph.replace_uses(fused.name, _item(graph, fused, 0, anchor).name)
    outside = [user for user in graph.users(state.name) if user.name not in inside]
    if outside:
        item = _item(graph, fused, 1, state)
        for user in outside:
            graph.set_inputs(user.name, [item.name if name == state.name else name for name in user.inputs])


def _item(graph: Graph, fused: Node, index: int, like: Node) -> Node:
    """fused[index], typed like the node whose value it stands for."""
    return graph.add(Node(name=graph.fresh_name(f"{fused.name}_{index}"), op="torch", inputs=[fused.name],
                          attrs={"target": "getitem"}, type=like.type, value=like.value, order=fused.order,
                          call=Call("call_function", operator.getitem, (Ref(0), index))))

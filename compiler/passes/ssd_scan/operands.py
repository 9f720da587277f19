"""From a recognised SSD to a fused op: discretisation, step sizes, groups, epilogue, layout, fusing.

    discretise   a = Δ ⊗ A and X = Δ ⊗ x share Δ (the same tensor); A varies along the heads only
    step sizes   Δ = clamp(softplus(dt + dt_bias), lo, hi), each part optional, looked through casts
    groups       B, C per head through repeat_interleave / repeat_kv from (b, l, g, n): g groups;
                 per head otherwise (g = h), or shared by all heads (g = 1)
    epilogue     after y: casts, a one-tensor cat, reshapes that merge or split dims, the slice that
                 drops the padding, + D x (D per head or per channel; x or x padded as y is), * silu(z)
    fuse         the op's operands with their roles (runtime.ssd_scan views them at run time), the
                 output in eager's shape and dtype, the final (or new) state when the graph reads it
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch

from compiler.passes import NoMatch, PassContext
from compiler.passes.ssd_scan.roles import Leaf, Roles, down_views, end_padding, is_real_cast, same_value, \
    sole_reader, static_shape, through_casts
from ir.contraction import Contraction, contraction
from ir.fused import SSD_SCAN_DIMS, SSD_STATE_UPDATE_DIMS, FusedSpec, Operand, Result, SSDLayout
from ir.graph import Call, Graph, Node, Ref
from ir.limits import KERNEL_DTYPES
from ir.match import check_private

INFINITY = float("inf")


@dataclass
class Discretised:
    """The SSD's inputs as the kernel takes them; roles use g for the groups of B and C."""

    x: Leaf
    dt: Leaf | None  # None: a discrete decay and input, Δ = 1
    A: Leaf
    B: Leaf
    C: Leaf
    groups: int
    dt_bias: Leaf | None = None
    softplus: bool = False
    limit: tuple[float, float] | None = None


def discretise(graph: Graph, sequences: dict[str, Leaf]) -> Discretised:
    """x, Δ, A, B, C from the sequences X = Δ ⊗ x, a = Δ ⊗ A, B, C (roles b, l, h, p, n); when a and X
    are not such products of one Δ (mamba_ssm's ssd_minimal_discrete on discrete inputs), x = X and
    A = a, with no Δ (the kernel's Δ is then 1)."""
    groups, B, C = grouped_bc(graph, sequences["B"], sequences["C"], _size(sequences["X"], "h"))
    factored = _factored(graph, sequences["a"], sequences["X"])
    if factored is None:
        return Discretised(under_upcasts(graph, sequences["X"]), None, under_upcasts(graph, sequences["a"]), B, C,
                           groups)
    x, step, rate = factored
    raw, bias, softplus, limit = step_sizes(graph, step)
    return Discretised(under_upcasts(graph, x), raw, under_upcasts(graph, rate), B, C, groups, bias, softplus, limit)


def _factored(graph: Graph, decay: Leaf, scaled: Leaf) -> tuple[Leaf, Leaf, Leaf] | None:
    """(x, Δ, A) when decay = Δ ⊗ A with A per head and scaled = Δ ⊗ x (the same Δ), else None."""
    decay_factors, scaled_factors = _factors_of_two(graph, decay), _factors_of_two(graph, scaled)
    step = next((leaf for leaf in decay_factors if "l" in leaf.roles), None)
    rate = next((leaf for leaf in decay_factors if "l" not in leaf.roles), None)
    if step is None or rate is None or set(rate.roles) - {"h", ""}:
        return None
    shared = [leaf for leaf in scaled_factors if same_value(graph, leaf.node, step.node) and _sized(leaf) == _sized(step)]
    if not shared:
        return None
    return next(leaf for leaf in scaled_factors if leaf is not shared[0]), step, rate


def _factors_of_two(graph: Graph, sequence: Leaf) -> list[Leaf]:
    """The two factors of a product with their roles (nothing summed); [] for anything else."""
    product = contraction(graph, sequence.node)
    if len(product.factors) != 2 or product.summed:
        return []
    return [Leaf(factor.node, factor_roles(product, factor.labels, factor.node, sequence.roles))
            for factor in product.factors]


def factor_roles(product: Contraction, labels: tuple, node: Node, out_roles: Roles) -> Roles:
    """The roles of a factor's dims, from the result dims they line up with (a unit dim keeps its
    role when it is the result's own unit dim, so a sequence of one step still has a time dim)."""
    role_of = dict(zip(product.out, out_roles))
    return tuple(role_of.get(label, "") for label in labels)


def _sized(leaf: Leaf) -> tuple:
    return tuple(role for role in leaf.roles if role)


def _size(leaf: Leaf, role: str) -> int:
    """The size of the dim of `leaf` that holds `role` alone (1 when none does)."""
    sizes = [size for size, roles in zip(static_shape(leaf.node), leaf.roles) if roles == role]
    return sizes[0] if sizes else 1


def under_upcasts(graph: Graph, leaf: Leaf) -> Leaf:
    """The tensor under exact copies and up-casts (fp16/bf16 -> fp32): the kernels read any float dtype."""
    node = leaf.node
    while is_real_cast(node):
        source = graph.node(node.inputs[0])
        if node.op != "identity" and not (source.type.dtype in (torch.float16, torch.bfloat16)
                                          and node.type.dtype == torch.float32):
            break
        node = source
    return Leaf(node, leaf.roles)


def grouped_bc(graph: Graph, B: Leaf, C: Leaf, heads: int) -> tuple[int, Leaf, Leaf]:
    """(groups, B, C) with the head dim relabelled g: under repeat_interleave / repeat_kv, per head, or shared."""
    grouped = [_grouped(graph, under_upcasts(graph, leaf)) for leaf in (B, C)]
    counts = {count for count, _ in grouped}
    if len(counts) != 1:
        raise NoMatch(C.node, f"B and C come in different groups of heads ({sorted(counts)})")
    count = counts.pop()
    if heads % count:
        raise NoMatch(B.node, f"{heads} heads do not split into {count} groups")
    return count, grouped[0][1], grouped[1][1]


def _grouped(graph: Graph, leaf: Leaf) -> tuple[int, Leaf]:
    if "h" not in leaf.roles:
        return 1, leaf
    dim = leaf.roles.index("h")
    node = leaf.node
    repeated = (node.op == "repeat_kv" and dim == 1) or (node.op == "repeat_interleave" and node.attrs["dim"] == dim)
    source = under_upcasts(graph, Leaf(graph.node(node.inputs[0]), leaf.roles)) if repeated else leaf
    groups = static_shape(source.node)[dim]
    roles = tuple("g" if k == dim and groups > 1 else ("" if k == dim else role) for k, role in enumerate(leaf.roles))
    return groups, Leaf(source.node, roles)


def step_sizes(graph: Graph, step: Leaf, head: str = "h"):
    """(raw dt, dt_bias or None, softplus, (lo, hi) or None) for Δ = clamp(softplus(dt + dt_bias), lo, hi),
    each looked at under its views and casts (an elementwise chain commutes with them)."""
    leaf, limit, softplus = down_views(graph, step.node, step.roles), None, False
    if leaf.node.op == "clamp":
        low, high = leaf.node.attrs["min"], leaf.node.attrs["max"]
        limit = (-INFINITY if low is None else float(low), INFINITY if high is None else float(high))
        leaf = down_views(graph, graph.node(leaf.node.inputs[0]), leaf.roles)
    if leaf.node.op == "softplus" and leaf.node.attrs["beta"] == 1 and leaf.node.attrs["threshold"] == 20:
        softplus = True
        leaf = down_views(graph, graph.node(leaf.node.inputs[0]), leaf.roles)
    node = leaf.node
    if node.op == "add" and node.attrs["scalar"] is None and len(node.inputs) == 2:
        for raw, bias in (node.inputs, node.inputs[::-1]):
            raw, bias = graph.node(raw), graph.node(bias)
            bias_roles = _broadcast_roles(bias, node, leaf.roles)
            if static_shape(raw) != static_shape(node) or bias_roles is None:
                continue
            bias_leaf = down_views(graph, bias, bias_roles)
            if {role for role, size in zip(bias_leaf.roles, static_shape(bias_leaf.node)) if size != 1} <= {head}:
                return (under_upcasts(graph, down_views(graph, raw, leaf.roles)), under_upcasts(graph, bias_leaf), softplus,
                        limit)
    return under_upcasts(graph, leaf), None, softplus, limit


def _broadcast_roles(source: Node, result: Node, roles: Roles) -> Roles | None:
    """Roles of `source` broadcast into `result` (whose dims have `roles`), or None when it does not broadcast."""
    source_shape, result_shape = static_shape(source), static_shape(result)
    offset = len(result_shape) - len(source_shape)
    if offset < 0 or any(size not in (1, result_shape[k + offset]) for k, size in enumerate(source_shape)):
        return None
    return tuple(roles[k + offset] if size != 1 else "" for k, size in enumerate(source_shape))


# -- epilogue ---------------------------------------------------------------------------------------------
@dataclass
class Epilogue:
    """y's readers up to the anchor: the op's output is the anchor, with `roles`."""

    anchor: Node
    roles: Roles
    D: Leaf | None = None
    z: Leaf | None = None
    nodes: list[str] = field(default_factory=list)


def epilogue(graph: Graph, y: Leaf, x: Leaf, padding: int) -> Epilogue:
    """Walk y's sole readers while they are casts, a cat of y alone, merging/splitting reshapes, the slice
    dropping `padding` steps of time, + D x and * silu(z); the anchor is the last one taken."""
    found = Epilogue(y.node, y.roles)
    while (reader := sole_reader(graph, found.anchor)) is not None:
        step = _epilogue_step(graph, found, reader, x, padding)
        if step is None:
            break
        found.anchor, found.roles = reader, step
        found.nodes.append(reader.name)
        if reader.op == "slice":
            padding = 0
    if padding:
        raise NoMatch(found.anchor, f"the output keeps the {padding} steps of padding (no slice drops them)")
    return found


def _epilogue_step(graph: Graph, found: Epilogue, reader: Node, x: Leaf, padding: int) -> Roles | None:
    """reader's roles when it belongs to the epilogue (recording D or z), else None."""
    roles = found.roles
    if is_real_cast(reader) or (reader.op == "cat" and len(reader.inputs) == 1):
        return roles
    if reader.op == "reshape":
        return _reshaped_roles(static_shape(found.anchor), static_shape(reader), roles)
    if reader.op == "slice" and padding and "l" in roles:
        time = roles.index("l")
        kept = static_shape(found.anchor)[time] - padding
        fits = (reader.attrs["dim"], reader.attrs["start"], reader.attrs["stop"], reader.attrs["step"]) == (time, 0, kept, 1)
        return roles if fits else None
    other = _other_input(reader, found.anchor)
    if other is None:
        return None
    if reader.op == "add" and found.D is None and found.z is None:
        found.D = _skip(graph, other, reader, roles, x, padding)
        return roles if found.D is not None else None
    if reader.op == "mul" and found.z is None:
        found.z = _gate(graph, other, reader, roles)
        return roles if found.z is not None else None
    return None


def _other_input(reader: Node, node: Node) -> str | None:
    """The other tensor of a binary op on node of node's shape, or None."""
    if reader.attrs.get("scalar") is not None or len(reader.inputs) != 2 or reader.type is None:
        return None
    if node.name not in reader.inputs or reader.type.static_shape() != node.type.static_shape():
        return None
    return reader.inputs[1] if reader.inputs[0] == node.name else reader.inputs[0]


def _skip(graph: Graph, other: str, add: Node, roles: Roles, x: Leaf, padding: int) -> Leaf | None:
    """D when other = D ⊗ x (x padded by `padding` steps as y is), D per head or per channel."""
    other_node = graph.node(other)
    product = contraction(graph, other_node)
    aligned = _broadcast_roles(other_node, add, roles)
    if len(product.factors) != 2 or product.summed or aligned is None:
        return None
    leaves = [Leaf(f.node, factor_roles(product, f.labels, f.node, aligned)) for f in product.factors]
    for skipped, scale in (leaves, leaves[::-1]):
        source = through_casts(graph, skipped.node)
        if "l" in skipped.roles and end_padding(source, skipped.roles.index("l")) == padding:
            source = through_casts(graph, graph.node(source.inputs[0]))  # x padded as y is (or by nothing)
        if under_upcasts(graph, Leaf(source, ())).node is x.node and set(scale.roles) <= {"h", "p", "hp", ""}:
            return under_upcasts(graph, scale)
    return None


def _gate(graph: Graph, other: str, mul: Node, roles: Roles) -> Leaf | None:
    """z when other = silu(z), z broadcast as y."""
    silu = through_casts(graph, graph.node(other))
    if silu.op != "silu":
        return None
    z = graph.node(silu.inputs[0])
    z_roles = _broadcast_roles(z, mul, roles)
    return None if z_roles is None else under_upcasts(graph, Leaf(z, z_roles))


def _reshaped_roles(shape: tuple, result: tuple, roles: Roles) -> Roles | None:
    """Roles after a reshape that merges adjacent dims or splits a merged one back (unit dims may come
    and go); None for anything else."""
    sized = [(size, role) for size, role in zip(shape, roles) if size != 1]
    out, at = [], 0
    for size in result:
        if size == 1:
            out.append("")
            continue
        merged, product = "", 1
        while at < len(sized) and product < size:
            product *= sized[at][0]
            merged += sized[at][1]
            at += 1
        if product != size:
            return None
        out.append(merged)
    return tuple(out) if at == len(sized) else None


# -- fusing -------------------------------------------------------------------------------------------------
def operand_list(disc: Discretised, tail: Epilogue, extra: dict[str, Leaf]) -> list[tuple[str, Leaf]]:
    named = [("x", disc.x), ("A", disc.A), ("B", disc.B), ("C", disc.C)]
    optional = {"dt": disc.dt, "D": tail.D, "z": tail.z, "dt_bias": disc.dt_bias, **extra}
    return named + [(name, leaf) for name, leaf in optional.items() if leaf is not None]


def layout(disc: Discretised, operands: list[tuple[str, Leaf]], tail: Epilogue, state: Leaf | None,
           seqlen: int, dims: dict[str, str]) -> SSDLayout:
    """The op's layout; every operand and output must hold only roles its kernel argument has (`dims`),
    each dim of the size its roles give (or a unit dim), so the run-time views always exist."""
    x, B = disc.x, disc.B
    sizes = dict(b=_size(x, "b"), l=seqlen, h=_size(x, "h"), p=_size(x, "p"), n=_size(B, "n"), g=disc.groups)
    for name, leaf in operands:
        if leaf.node.type.dtype not in KERNEL_DTYPES:
            raise NoMatch(leaf.node, f"{name} has dtype {leaf.node.type.dtype}: the SSD kernels take fp32, fp16, bf16")
        _check_dims(name, leaf, dims[name], sizes)
    _check_dims("the output", Leaf(tail.anchor, tail.roles), dims["out"], sizes)
    if state is not None:
        _check_dims("the state", state, "bhpn", sizes)
    out = Result(tail.roles, static_shape(tail.anchor), tail.anchor.type.dtype)
    state_result = None if state is None else Result(state.roles, static_shape(state.node), state.node.type.dtype)
    return SSDLayout(tuple(Operand(name, leaf.roles) for name, leaf in operands), tuple(sizes.items()), out,
                     state_result, disc.softplus, disc.limit)


def _check_dims(name: str, leaf: Leaf, target: str, sizes: dict[str, int]) -> None:
    for roles, size in zip(leaf.roles, static_shape(leaf.node)):
        expected = 1
        for role in roles:
            expected *= sizes[role]
        if set(roles) - set(target) or (size != expected and size != 1) or (not roles and size != 1):
            raise NoMatch(leaf.node, f"{name} has a dim of {size} along {roles or 'no axis'}, where the kernel's "
                                     f"{name} is laid out ({', '.join(target)})")


def between(graph: Graph, operands: list[Leaf], anchor: Node) -> list[str]:
    """The nodes on paths from the operands to the anchor (what the op replaces), in order."""
    upstream = nx.ancestors(graph.nx, anchor.name) | {anchor.name}
    downstream = set().union(*(nx.descendants(graph.nx, leaf.node.name) for leaf in operands))
    return sorted(upstream & downstream, key=lambda name: graph.node(name).order)


def _check_private(graph: Graph, nodes: set[str], inside: set[str]) -> None:
    """Nothing outside reads what the op computes internally (it would be computed twice)."""
    check_private(graph, sorted(nodes, key=lambda name: graph.node(name).order), inside,
                  "is also read by {reader} outside the SSD")


def fuse_scan(graph: Graph, context: PassContext, disc: Discretised, y: Leaf, padding: int, final: Leaf | None,
              initial: Leaf | None, core: set[str], detail: str) -> None:
    """The scan op in place of y's epilogue; the final state returned when something besides the
    replaced nodes reads `final`."""
    tail = epilogue(graph, y, disc.x, padding)
    operands = operand_list(disc, tail, {"initial_state": initial})
    replaced = between(graph, [leaf for _, leaf in operands], tail.anchor)
    state = final if final is not None and any(user.name not in replaced for user in graph.users(final.node.name)) \
        else None
    fused_layout = layout(disc, operands, tail, state, _size(disc.x, "l"), SSD_SCAN_DIMS)
    inside = set(replaced) | ({final.node.name} if final is not None else set())
    _check_private(graph, core - {tail.anchor.name}, inside)
    spec = FusedSpec("ssd_scan", dict(layout=fused_layout))
    _fuse(graph, context, spec, operands, tail.anchor, state, replaced, f"{detail}, {fused_layout.describe()}")


def fuse_decode(graph: Graph, context: PassContext, disc: Discretised, y: Leaf, state_in: Leaf, new_state: Leaf,
                core_nodes: set[str], detail: str) -> None:
    tail = epilogue(graph, y, disc.x, 0)
    operands = [("state", state_in)] + operand_list(disc, tail, {})
    fused_layout = layout(disc, operands, tail, new_state, 1, SSD_STATE_UPDATE_DIMS)
    replaced = between(graph, [leaf for _, leaf in operands], tail.anchor)
    inside = set(replaced) | core_nodes
    _check_private(graph, core_nodes - {tail.anchor.name, new_state.node.name}, inside)
    spec = FusedSpec("ssd_scan", dict(layout=fused_layout), op="ssd_state_update")
    _fuse(graph, context, spec, operands, tail.anchor, new_state, replaced, f"{detail}, {fused_layout.describe()}")


def _fuse(graph: Graph, context: PassContext, spec: FusedSpec, operands, anchor: Node, state: Leaf | None, replaced,
          detail):
    """Replace the anchor by the op; with a state, the op returns (out, state) and the state's readers
    outside the replaced nodes read it from there."""
    fused = context.fuse(graph, anchor, spec, [leaf.node.name for _, leaf in operands], replaced, detail)
    if state is None:
        return
    fused.type, fused.value = None, (anchor.value, state.node.value)
    graph.replace_uses(fused.name, _item(graph, fused, 0, anchor).name)
    item = _item(graph, fused, 1, state.node)
    for user in graph.users(state.node.name):
        if user.name not in replaced:
            graph.set_inputs(user.name, [item.name if name == state.node.name else name for name in user.inputs])


def _item(graph: Graph, fused: Node, index: int, like: Node) -> Node:
    """fused[index], typed like the node whose value it stands for."""
    return graph.add(Node(name=graph.fresh_name(f"{fused.name}_{index}"), op="torch", inputs=[fused.name],
                          attrs={"target": "getitem"}, type=like.type, value=like.value, order=fused.order,
                          call=Call("call_function", operator.getitem, (Ref(0), index))))

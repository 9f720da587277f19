"""The chunked SSD form: Dao & Gu's algorithm as Hugging Face's mamba2_chunk_scan (torch_forward)
and mamba_ssm's ssd_minimal_discrete write it, read through contractions (ir.contraction) so that
any grouping of the products, index order, einsum or matmul spelling reads alike.

With a = Δ ⊗ A (b, L, h), X = Δ ⊗ x (b, L, h, p), B, C (b, L, h, n), each padded with zeros to
whole chunks and cut into (b, c, t, ...) (a permuted to end in (c, t)), and cs = cumsum(a, t):

    Y_diag  = Σ_{s,n} C[c,t,n] B[c,s,n] exp(segsum(a))[c,t,s] X[c,s,p]       the anchor: exp(segsum(a))
    states  = Σ_t B[c,t,n] exp(cs[c,-1] - cs[c,t]) X[c,t,p]                  each chunk alone
    new     = Σ_s exp(segsum(pad(cs[:, -1], (1, 0))))[z,s] P[s]               P = pad(states, (1, 0) on c)
                                                                             or cat([S0, states], c)
    Y_off   = Σ_n C[c,t,n] new[z=c][p,n] exp(cs[c,t])                         new[:-1] on the chunk dim
    y       = reshape(Y_diag + Y_off, (b, c * t, h, p)), then the epilogue (operands.py)
    final   = new[-1] on the chunk dim, when read

Each contraction must have exactly these factors with their dims lined up as written (ir
contraction labels bound to roles, roles.bind); the first node that differs is reported.

The quadratic form (the SSD as masked attention, the paper's eq. 16; no chunk reshape under the
decay) is Y_diag over the whole sequence alone, y = Σ_{s,n} C[t,n] B[s,n] exp(segsum(a))[t,s] X[s,p]:
exactly the scan from a zero state, so that product is replaced by the scan op and its epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.passes import NoMatch, PassContext
from compiler.passes.ssd_scan.operands import discretise, fuse_scan
from compiler.passes.ssd_scan.roles import (
    Chunked, Leaf, Roles, bind, climb, down_views, find_chunks, out_roles, sole_reader, static_shape, summed_roles)
from ir.contraction import Contraction, Factor, active, contraction
from ir.graph import Graph, Node


@dataclass
class Diagonal:
    """Y_diag's factors and the roles of their dims; a_ch the chunked decay under the mask."""

    root: Node
    contraction: Contraction
    X: Leaf
    B: Leaf
    C: Leaf
    a: Leaf
    out: Roles
    chunked: bool  # False: a over the whole sequence (the quadratic form)


def is_candidate(node: Node) -> bool:
    """segsum of a chunked decay (not of the chunk totals padded in front: that one is the boundary decay)."""
    return node.op == "segsum"


def fuse_chunked(graph: Graph, segsum: Node, context: PassContext) -> None:
    if graph.node(segsum.inputs[0]).op == "pad":
        return  # exp(segsum(pad(cs[..., -1], (1, 0)))): the decay across chunk boundaries, read below
    mask = sole_reader(graph, segsum)
    if mask is None or mask.op != "exp":
        raise NoMatch(segsum, "the segment sums are not read by exp alone (the decay mask exp(segsum(a)))")
    diagonal = _diagonal(graph, mask)
    if not diagonal.chunked:
        _fuse_quadratic(graph, diagonal, context)
        return
    chunks = {name: _unchunked(graph, getattr(diagonal, name)) for name in ("X", "B", "C", "a")}
    _check_chunking(chunks)
    total = _sum_of_terms(graph, diagonal)
    core = _off_diagonal(graph, diagonal, _running_sum(graph, diagonal.a.node), total)
    discretised = discretise(graph, {name: _sequence_leaf(chunk) for name, chunk in chunks.items()})
    y = _merged_output(graph, core.total, diagonal.out)
    detail = f"chunked, {chunks['a'][0].chunks} chunks of {chunks['a'][0].steps}"
    fuse_scan(graph, context, discretised, y, chunks["X"][0].pad, core.final, core.initial, core.nodes, detail)


# -- Y_diag: the intra-chunk product, where every role is first told apart ------------------------
def _diagonal(graph: Graph, mask: Node) -> Diagonal:
    """Y_diag read as C, B, the mask and X; where the product also looked into X = Δ ⊗ x (nothing cut
    it into chunks: the quadratic form), read again with each product under it kept as a factor."""
    root = climb(graph, mask)
    product = contraction(graph, root, regroups=False)
    products = [name for name in product.nodes if graph.node(name).op == "mul" and name != root.name]
    first_miss = None
    for keep in [frozenset()] + [frozenset({name}) for name in products]:
        try:
            return _diagonal_of(graph, mask, root, contraction(graph, root, keep, regroups=False))
        except NoMatch as miss:
            first_miss = first_miss or miss
    raise first_miss


def _diagonal_of(graph: Graph, mask: Node, root: Node, product: Contraction) -> Diagonal:
    mask_factor = next((factor for factor in product.factors if factor.node is mask), None)
    if mask_factor is None or len(product.factors) != 4:
        names = [factor.node.name for factor in product.factors]
        raise NoMatch(root, f"the decay mask is one of {names}, not of C, B, the mask and X (Y_diag)")
    target, source = mask_factor.labels[-2:]
    others = [factor for factor in product.factors if factor is not mask_factor]
    X = _one(others, lambda f: source in active(f) and set(active(f)) & set(product.out) - set(mask_factor.labels),
             root, "X (the factor summed over the source step with the head dim left)")
    C = _one(others, lambda f: target in active(f) and f is not X, root, "C (the factor at the target step)")
    (B,) = [factor for factor in others if factor not in (X, C)]
    state = set(active(C)) & set(active(B)) & product.summed - {source}
    value = set(active(X)) & set(product.out) - set(mask_factor.labels)
    if len(state) != 1 or len(value) != 1 or product.summed != {source} | state:
        raise NoMatch(root, "Y_diag does not sum C B^T over one state dim and the source step exactly")
    role_of = {target: "t", source: "t", state.pop(): "n", value.pop(): "p"}
    a = graph.node(graph.node(mask.inputs[0]).inputs[0])
    lead = mask_factor.labels[:-2]
    lead_roles, chunked = _lead_roles(graph, a, lead)
    role_of.update(lead_roles)
    roles = {name: _factor_roles(factor, role_of) for name, factor in (("X", X), ("B", B), ("C", C))}
    a_roles = tuple(role_of.get(label, "") if size != 1 else "" for label, size in zip(lead, static_shape(a)))
    return Diagonal(root, product, Leaf(X.node, roles["X"]), Leaf(B.node, roles["B"]), Leaf(C.node, roles["C"]),
                    Leaf(a, a_roles + ("t",)), out_roles(product, role_of, root), chunked)


def _one(factors: list[Factor], test, where: Node, what: str) -> Factor:
    found = [factor for factor in factors if test(factor)]
    if len(found) != 1:
        raise NoMatch(where, f"no single factor is {what}")
    return found[0]


def _factor_roles(factor: Factor, role_of: dict[str, str]) -> Roles:
    roles = []
    for label, size in zip(factor.labels, static_shape(factor.node)):
        if size != 1 and label not in role_of:
            raise NoMatch(factor.node, "has a dim that lines up with no axis of the SSD")
        roles.append(role_of.get(label, "") if size != 1 else "")
    return tuple(roles)


def _lead_roles(graph: Graph, a: Node, lead: tuple) -> tuple[dict[str, str], bool]:
    """Roles of the decay's dims before the step (their labels in Y_diag are `lead`): the chunk (the
    dim its reshape splits off), the head (the one dim the rate A varies along, a = Δ ⊗ A) and the
    batch; and whether a is cut into chunks. A decay given as is (mamba_ssm's discrete inputs) names
    its two other dims batch and head in order: the scan treats the two alike (B and C broadcast
    along either), so either is right."""
    chunked, positions = _chunks_or_whole(graph, a, tuple(str(k) for k in range(len(lead))) + ("t",))
    split = int(chunked.node is not chunked.seq)  # the chunk reshape's extra dim, before the step
    roles = {lead[int(positions[chunked.time])]: "c"} if positions[chunked.time] not in ("", "t") else {}
    heads = _rate_dims(graph, chunked)
    others = [(label, lead[int(position)]) for k, label in enumerate(contraction(graph, chunked.seq).out)
              if k != chunked.time and static_shape(chunked.seq)[k] != 1
              and (position := positions[k if k < chunked.time else k + split]) not in ("", "t")]
    if len(others) > 2:
        raise NoMatch(a, "the decay has dims besides batch, head, chunk and step")
    for k, (label, lead_label) in enumerate(others):
        roles[lead_label] = ("h" if label in heads else "b") if heads is not None else "bh"[k + 2 - len(others)]
    if heads is not None and sorted(roles.values()).count("h") > 1:
        raise NoMatch(a, "the decay has dims besides batch, head, chunk and step")
    return roles, bool(split)


def _chunks_or_whole(graph: Graph, a: Node, labels: Roles) -> tuple[Chunked, Roles]:
    """find_chunks; or, with no chunk reshape under a's views, the whole sequence as one chunk
    (node and seq the tensor under the views)."""
    try:
        return find_chunks(graph, a, labels)
    except NoMatch:
        whole = down_views(graph, a, labels)
        if "t" not in whole.roles:
            raise
        time = whole.roles.index("t")
        return Chunked(whole.node, whole.node, time, 1, static_shape(whole.node)[time], 0), whole.roles


def _rate_dims(graph: Graph, chunked: Chunked) -> set | None:
    """The labels (in the decay sequence's own contraction) of the one dim the per-head rate A of
    a = Δ ⊗ A varies along; None when the decay is no such product (a discrete decay)."""
    sequence = contraction(graph, chunked.seq)
    time_label = sequence.out[chunked.time]
    rate = [factor for factor in sequence.factors if time_label not in factor.labels]
    if len(sequence.factors) != 2 or sequence.summed or len(rate) != 1 or len(active(rate[0])) > 1:
        return None
    return set(active(rate[0]))


def _fuse_quadratic(graph: Graph, diagonal: Diagonal, context: PassContext) -> None:
    """Y_diag over the whole sequence is the output: the scan op from a zero state in its place."""
    sequences = {name: _whole_sequence(getattr(diagonal, name)) for name in ("X", "B", "C", "a")}
    discretised = discretise(graph, sequences)
    y = _whole_sequence(Leaf(diagonal.root, diagonal.out))
    detail = f"quadratic form (masked attention), L={static_shape(diagonal.a.node)[-1]}"
    fuse_scan(graph, context, discretised, y, 0, None, None, set(diagonal.contraction.nodes), detail)


def _whole_sequence(leaf: Leaf) -> Leaf:
    """The leaf with its step role as time: one chunk is the whole sequence."""
    return Leaf(leaf.node, tuple("l" if role == "t" else role for role in leaf.roles))


# -- chunking ---------------------------------------------------------------------------------------
def _unchunked(graph: Graph, leaf: Leaf) -> tuple[Chunked, Leaf]:
    """(how the leaf's sequence was cut into chunks, the chunk reshape with its dims' roles)."""
    chunked, roles = find_chunks(graph, leaf.node, leaf.roles)
    if roles[chunked.time] not in ("c", ""):
        raise NoMatch(chunked.node, "the dim before the step is not the chunk dim")
    return chunked, Leaf(chunked.node, roles[:chunked.time] + ("c",) + roles[chunked.time + 1:])


def _check_chunking(chunks: dict[str, tuple[Chunked, Leaf]]) -> None:
    """X, B, C and the decay are cut into the same chunks from sequences of one length."""
    first, _ = chunks["a"]
    for chunked, _ in chunks.values():
        if (chunked.chunks, chunked.steps, chunked.pad) != (first.chunks, first.steps, first.pad):
            raise NoMatch(chunked.node, f"chunked as {chunked.chunks} x {chunked.steps} (+{chunked.pad} padding), "
                                        f"the decay as {first.chunks} x {first.steps} (+{first.pad})")


def _sequence_leaf(chunked_leaf) -> Leaf:
    """The sequence under a chunk reshape, its (c, t) dims merged into time l."""
    chunked, leaf = chunked_leaf
    roles = leaf.roles[:chunked.time] + ("l",) + leaf.roles[chunked.time + 2:]
    return Leaf(chunked.seq, roles)


def _running_sum(graph: Graph, a: Node) -> Node:
    """cs = cumsum(a) along the step dim (a's last)."""
    for reader in graph.users(a.name):
        if reader.op == "cumsum" and reader.attrs["dim"] == a.type.rank - 1 and reader.attrs["dtype"] is None:
            return reader
    raise NoMatch(a, "no cumsum along the step dim reads the chunked decay (cs, for the states between chunks)")


# -- the states and the off-diagonal term ------------------------------------------------------------
@dataclass
class Core:
    """What the op replaces up to y_ch = Y_diag + Y_off, and the final state if the graph reads it."""

    total: Node
    final: Leaf | None  # new[-1] on the chunk dim, with its roles
    initial: Leaf | None
    nodes: set[str]


def _sum_of_terms(graph: Graph, diagonal: Diagonal) -> Node:
    """Y_diag + Y_off: Y_diag's only reader."""
    total = sole_reader(graph, diagonal.root)
    if total is None or total.op != "add" or total.attrs["scalar"] is not None or len(total.inputs) != 2:
        raise NoMatch(diagonal.root, "Y_diag is not added to the off-diagonal term alone")
    return total


def _off_diagonal(graph: Graph, diagonal: Diagonal, cumsum: Node, total: Node) -> Core:
    off_root = graph.node(next(name for name in total.inputs if name != diagonal.root.name))
    off = contraction(graph, off_root, regroups=False)
    decay_out = _factor(off, lambda node: node.op == "exp" and node.inputs == [cumsum.name], off_root,
                        "exp(cs), the decay from each chunk's start")
    starts = next((f.node for f in off.factors if f.node not in (decay_out, diagonal.C.node)), None)
    if starts is None or starts.op != "slice":
        raise NoMatch(off_root, "Y_off does not read the chunks' start states (new[:, :-1])")
    new = graph.node(starts.inputs[0])
    new_roles, initial, new_nodes = _passing(graph, diagonal, cumsum, new)
    z = new_roles.index("z")
    chunks = static_shape(new)[z] - 1
    if (starts.attrs["dim"], starts.attrs["start"], starts.attrs["stop"], starts.attrs["step"]) != (z, 0, chunks, 1):
        raise NoMatch(starts, f"is not the states at the start of each chunk (new[{chunks} chunks] along dim {z})")
    start_roles = tuple("c" if role == "z" else role for role in new_roles)
    role_of = bind(off, {diagonal.C.node.name: diagonal.C.roles, decay_out.name: diagonal.a.roles,
                         starts.name: start_roles}, off_root)
    if summed_roles(off, role_of) != {"n"} or _sized(out_roles(off, role_of, off_root)) != _sized(diagonal.out):
        raise NoMatch(off_root, "Y_off is not C times each chunk's start state over n, decayed, laid out as Y_diag")
    final = next((Leaf(user, new_roles[:z] + new_roles[z + 1:]) for user in graph.users(new.name)
                  if user.op == "select" and user.attrs["dim"] == z and user.attrs["index"] == chunks), None)
    nodes = {total.name, *off.nodes, *diagonal.contraction.nodes, starts.name, *new_nodes, cumsum.name}
    return Core(total, final, initial, nodes)


def _sized(roles: Roles) -> tuple:
    return tuple(role for role in roles if role)


def _factor(product: Contraction, test, where: Node, what: str) -> Node:
    found = [factor.node for factor in product.factors if test(factor.node)]
    if len(found) != 1:
        raise NoMatch(where, f"has no factor {what}")
    return found[0]


def _passing(graph: Graph, diagonal: Diagonal, cumsum: Node, new: Node):
    """new = Σ_s exp(segsum(pad(cs[..., -1], (1, 0))))[z, s] P[s]: (new's roles, the initial state leaf
    or None, the nodes read through)."""
    product = contraction(graph, new, regroups=False)
    decay = _factor(product, lambda node: node.op == "exp" and graph.node(node.inputs[0]).op == "segsum", new,
                    "exp(segsum(...)), the decay between chunk boundaries")
    boundary_roles, boundary_nodes = _boundary_decay(graph, diagonal, cumsum, decay)
    padded = next((f.node for f in product.factors if f.node is not decay), None)
    states, initial, chunk_dim = _prepended(graph, padded, new)
    states_roles, states_nodes = _chunk_states(graph, diagonal, cumsum, states)
    if states_roles[chunk_dim] not in ("c", ""):
        raise NoMatch(padded, f"puts the initial state in front along the chunk states' {states_roles[chunk_dim]} dim")
    padded_roles = tuple("s" if k == chunk_dim else role for k, role in enumerate(states_roles))
    role_of = bind(product, {decay.name: boundary_roles, padded.name: padded_roles}, new)
    roles = out_roles(product, role_of, new)
    if summed_roles(product, role_of) != {"s"} or "z" not in roles:
        raise NoMatch(new, "the boundary states are not the chunk states summed over the source chunk")
    initial_leaf = None if initial is None else Leaf(initial, tuple("" if k == chunk_dim else role
                                                                     for k, role in enumerate(states_roles)))
    return roles, initial_leaf, [*product.nodes, decay.name, *boundary_nodes, padded.name, states.name, *states_nodes]


def _boundary_decay(graph: Graph, diagonal: Diagonal, cumsum: Node, decay: Node):
    """Roles of exp(segsum(pad(cs[..., -1], (1, 0)))): the decay's lead roles, then target z and source s."""
    segsum = graph.node(decay.inputs[0])
    padded = graph.node(segsum.inputs[0])
    totals = graph.node(padded.inputs[0]) if padded.op == "pad" else None
    step = diagonal.a.node.type.rank - 1
    if (totals is None or padded.attrs["pad"] != (1, 0) or padded.attrs["value"] != 0 or totals.op != "select"
            or totals.inputs != [cumsum.name] or totals.attrs["dim"] != step
            or totals.attrs["index"] != static_shape(cumsum)[step] - 1):
        raise NoMatch(segsum, "is not the segment sums of each chunk's total decay with a zero in front "
                              "(segsum(pad(cs[..., -1], (1, 0))))")
    lead = diagonal.a.roles[:-1]
    if lead[-1] not in ("c", ""):
        raise NoMatch(totals, "the chunk dim is not last once the step is summed")
    return lead[:-1] + ("z", "s"), [segsum.name, padded.name, totals.name]


def _prepended(graph: Graph, padded: Node | None, new: Node) -> tuple[Node, Node | None, int]:
    """(states, initial state or None, chunk dim) for pad(states, (1, 0) on the chunk dim) or
    cat([S0, states], chunk dim)."""
    if padded is not None and padded.op == "pad":
        states = graph.node(padded.inputs[0])
        rank = states.type.rank
        widths = list(padded.attrs["pad"]) + [0] * (2 * rank - len(padded.attrs["pad"]))
        dims = [k for k in range(rank) if widths[2 * (rank - 1 - k)] or widths[2 * (rank - 1 - k) + 1]]
        if len(dims) != 1 or widths[2 * (rank - 1 - dims[0]):2 * (rank - dims[0])] != [1, 0] \
                or padded.attrs["value"] != 0:
            raise NoMatch(padded, "does not put one zero state in front of the chunk states")
        return states, None, dims[0]
    if padded is not None and padded.op == "cat" and len(padded.inputs) == 2:
        initial, states = (graph.node(name) for name in padded.inputs)
        if static_shape(initial)[padded.attrs["dim"]] != 1:
            raise NoMatch(initial, "the initial state is not one chunk's state")
        return states, initial, padded.attrs["dim"]
    raise NoMatch(padded or new, "the chunk states do not start from zeros (pad) or an initial state (cat)")


def _chunk_states(graph: Graph, diagonal: Diagonal, cumsum: Node, states: Node) -> tuple[Roles, list[str]]:
    """states = Σ_t B[c,t,n] exp(cs[c,-1] - cs[c,t]) X[c,t,p]: (its roles, the nodes read through)."""
    product = contraction(graph, states, regroups=False)
    decay = _factor(product, lambda node: node.op == "exp" and _is_decay_to_end(graph, node, cumsum), states,
                    "exp(cs[..., -1:] - cs), the decay to each chunk's end")
    role_of = bind(product, {diagonal.B.node.name: diagonal.B.roles, diagonal.X.node.name: diagonal.X.roles,
                             decay.name: diagonal.a.roles}, states)
    roles = out_roles(product, role_of, states)
    if summed_roles(product, role_of) != {"t"} or not {"p", "n"} <= set(roles):
        raise NoMatch(states, "the chunk states are not B ⊗ X summed over the chunk's steps")
    difference = graph.node(decay.inputs[0])
    return roles, [*product.nodes, decay.name, difference.name, difference.inputs[0]]


def _is_decay_to_end(graph: Graph, exp: Node, cumsum: Node) -> bool:
    """exp(cs[..., -1:] - cs) (the last step kept as a unit dim, or selected and unsqueezed)."""
    difference = graph.node(exp.inputs[0])
    if difference.op != "sub" or len(difference.inputs) != 2 or difference.inputs[1] != cumsum.name:
        return False
    last = graph.node(difference.inputs[0])
    step, steps = cumsum.type.rank - 1, static_shape(cumsum)[-1]
    if last.op == "reshape" and graph.node(last.inputs[0]).op == "select":
        last = graph.node(last.inputs[0])
        return last.inputs == [cumsum.name] and (last.attrs["dim"], last.attrs["index"]) == (step, steps - 1)
    return (last.op == "slice" and last.inputs == [cumsum.name]
            and (last.attrs["dim"], last.attrs["start"], last.attrs["stop"]) == (step, steps - 1, steps))


# -- the output, chunks merged back into time ----------------------------------------------------------
def _merged_output(graph: Graph, total: Node, roles: Roles) -> Leaf:
    """y = Y_diag + Y_off with its (c, t) dims merged into time: the reshape after it (copies aside)."""
    node = total
    while (reader := sole_reader(graph, node)) is not None and reader.op == "identity":
        node = reader
    merged = sole_reader(graph, node)
    step = roles.index("t")
    shape = static_shape(node)
    if merged is None or merged.op != "reshape" or step == 0 or roles[step - 1] not in ("c", ""):
        raise NoMatch(node, "Y_diag + Y_off is not reshaped back to a sequence")
    if static_shape(merged) != shape[:step - 1] + (shape[step - 1] * shape[step],) + shape[step + 1:]:
        raise NoMatch(merged, "does not merge the chunk and step dims back into time")
    return Leaf(merged, roles[:step - 1] + ("l",) + roles[step + 1:])


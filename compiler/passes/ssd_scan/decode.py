"""The SSD decode step: one token from a carried state (b, h, p, n), as Hugging Face's
mamba2_selective_state_update and mamba_ssm's Mamba2.step write it:

    S' = exp(Δ ⊗ A) * S + Δ ⊗ x ⊗ B          the candidate: an add of rank 4
    y  = Σ_n S'[.., n] C[.., n]                (any spelling: einsum, bmm on (b*h, p, n) views, mul + sum)

then the epilogue (+ D x, * silu(z)). Roles: n is the dim the readout sums; h the one dim the rate
A varies along; b the other dim the step size Δ varies along once its bias, softplus, limits and
expands are looked through (per head: the decay is a scalar per head, Mamba-2's restriction); p
the remaining dim of S. The graph's copy_ of S' into its cache stays; the op returns S' for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.passes import NoMatch, PassContext
from compiler.passes.ssd_scan.operands import (
    Discretised, factor_roles, fuse_decode, grouped_bc, step_sizes, under_upcasts)
from compiler.passes.ssd_scan.roles import Leaf, Roles, down_views, same_value, static_shape, through_casts
from ir.contraction import Contraction, active, contraction
from ir.graph import Graph, Node


def is_step_candidate(node: Node) -> bool:
    return (node.op == "add" and node.attrs["scalar"] is None and len(node.inputs) == 2 and node.type is not None
            and node.type.rank == 4 and node.type.static_shape() is not None)


@dataclass
class Step:
    """One recognised step: its inputs, the readout y, the carried state S and the new state S'."""

    disc: Discretised
    y: Leaf
    state: Leaf
    new_state: Leaf
    core: set[str]


def fuse_decode_step(graph: Graph, h: Node, context: PassContext) -> None:
    step = match_step(graph, h)
    if step is not None:
        fuse_decode(graph, context, step.disc, step.y, step.state, step.new_state, step.core, "decode step")


def match_step(graph: Graph, h: Node) -> Step | None:
    """h and its readout as one SSD step, None when h is no carried recurrence read out by a
    product with C; NoMatch when it looks like one but breaks."""
    carried = _carried(graph, h)
    readout = _readout(graph, h) if carried is not None else None
    if readout is None:
        return None
    decay_product, state_factor, decay, update_root = carried
    y_root, product, n_label = readout
    state_roles = tuple("n" if label == n_label else "" if size == 1 else str(k)
                        for k, (label, size) in enumerate(zip(_labels_of(product, h), static_shape(h))))
    renamed, disc, state = _discretised(graph, h, decay_product, state_factor, decay, update_root, state_roles)
    y = Leaf(y_root, _rename(_factor_roles_by_label(product, h, state_roles, product.out), renamed))
    disc = _with_c(graph, disc, _c_leaf(graph, product, h, state_roles, renamed))
    core = {h.name, update_root.name, *decay_product.nodes, *product.nodes}
    return Step(disc, y, Leaf(state.node, _rename(state.roles, renamed)), Leaf(h, _rename(state_roles, renamed)),
                core)


def _carried(graph: Graph, h: Node):
    """(decay product, the state factor, exp node, the update's root) when h = exp(...) * S + update."""
    for mul_name, update_name in (h.inputs, h.inputs[::-1]):
        mul = graph.node(mul_name)
        if mul.op != "mul" or mul.attrs["scalar"] is not None or static_shape(mul) != static_shape(h):
            continue
        product = contraction(graph, mul)
        exps = [f for f in product.factors if through_casts(graph, f.node).op == "exp"]
        if len(product.factors) == 2 and len(exps) == 1:
            state = next(f for f in product.factors if f is not exps[0])
            if static_shape(state.node) == static_shape(h):
                return product, state, through_casts(graph, exps[0].node), graph.node(update_name)
    return None


def _readout(graph: Graph, h: Node) -> tuple[Node, Contraction, str] | None:
    """(y's root, its contraction, the summed state label) for the product of h with C over one dim."""
    for reader in graph.users(h.name):
        node = reader
        while node.op in ("cast", "identity", "reshape", "permute") and len(graph.users(node.name)) == 1:
            node = graph.users(node.name)[0]
        if node.op not in ("matmul", "einsum", "sum", "mul"):
            continue
        root = _product_root(graph, node)
        product = contraction(graph, root)
        mine = [f for f in product.factors if f.node is h]
        if len(product.factors) == 2 and len(mine) == 1 and len(product.summed) == 1:
            (n_label,) = product.summed
            if n_label in mine[0].labels:
                return root, product, n_label
    return None


def _product_root(graph: Graph, node: Node) -> Node:
    """The last of the products and views reading node one after another (a bmm's result viewed back)."""
    while len(users := graph.users(node.name)) == 1 and users[0].op in ("reshape", "sum", "cast", "identity",
                                                                          "permute") and users[0].type is not None:
        if users[0].op == "reshape" and users[0].type.rank < 2:
            break
        node = users[0]
    return node


def _labels_of(product: Contraction, node: Node) -> tuple:
    return next(f.labels for f in product.factors if f.node is node)


def _factor_roles_by_label(product: Contraction, node: Node, node_roles: Roles, labels: tuple) -> Roles:
    """Roles of dims labelled `labels`, from the labels of `node`'s dims and their roles."""
    role_of = dict(zip(_labels_of(product, node), node_roles))
    return tuple(role_of.get(label, "") for label in labels)


def _rename(roles: Roles, renamed: dict[str, str]) -> Roles:
    return tuple(renamed.get(role, role) for role in roles)


def _discretised(graph: Graph, h: Node, decay_product: Contraction, state_factor, decay: Node, update_root: Node,
                 roles: Roles):
    """(placeholder -> role, the discretised inputs without C, the state leaf) from S' = exp(Δ ⊗ A) S + Δ x ⊗ B."""
    state = Leaf(state_factor.node, factor_roles(decay_product, state_factor.labels, state_factor.node, roles))
    exp_factor = next(f for f in decay_product.factors if f is not state_factor)
    exp_roles = factor_roles(decay_product, exp_factor.labels, exp_factor.node, roles)
    exponent = contraction(graph, graph.node(decay.inputs[0]))
    parts = [Leaf(f.node, factor_roles(exponent, f.labels, f.node, exp_roles)) for f in exponent.factors]
    if len(parts) != 2 or exponent.summed:
        raise NoMatch(decay, "the decay is not exp(Δ ⊗ A)")
    update = contraction(graph, update_root)
    steps = [part for part in parts if any(same_value(graph, f.node, part.node) for f in update.factors)]
    if len(steps) != 1:
        raise NoMatch(update_root, "the update does not share the decay's step size Δ")
    step = steps[0]
    rate = down_views(graph, under_upcasts(graph, next(p for p in parts if p is not step)).node,
                      next(p for p in parts if p is not step).roles)
    heads = {role for role, size in zip(rate.roles, static_shape(rate.node)) if size != 1}
    raw, bias, softplus, limit = step_sizes(graph, step, next(iter(heads), "h"))
    batch_heads = {role for role, size in zip(raw.roles, static_shape(raw.node)) if size != 1}
    if len(heads) > 1 or "n" in heads or not heads <= batch_heads or len(batch_heads - heads) > 1 or "n" in batch_heads:
        raise NoMatch(decay, "the decay is not a scalar per head (Δ varies along batch and heads, A along heads)")
    (head,) = heads or {next(iter(batch_heads - {"n"}), "h")}
    batch = next(iter(batch_heads - heads), None)
    value = [role for role in roles if role not in ("n", "", head, batch)]
    renamed = {head: "h", **({batch: "b"} if batch else {}), **({value[0]: "p"} if value else {})}
    if len(value) != 1:
        raise NoMatch(h, "the state has dims besides batch, heads, head dim and state")
    leaves = [Leaf(f.node, factor_roles(update, f.labels, f.node, roles)) for f in update.factors]
    others = [leaf for leaf in leaves if not same_value(graph, leaf.node, step.node)]
    B = next((leaf for leaf in others if "n" in leaf.roles), None)
    x = next((leaf for leaf in others if leaf is not B), None)
    if len(leaves) != 3 or len(others) != 2 or B is None or x is None or "n" in x.roles \
            or static_shape(update_root) != static_shape(h):
        raise NoMatch(update_root, "the update is not Δ ⊗ x ⊗ B")
    bias_leaf = None if bias is None else Leaf(bias.node, _rename(bias.roles, renamed))
    disc = Discretised(under_upcasts(graph, Leaf(x.node, _rename(x.roles, renamed))),
                       Leaf(raw.node, _rename(raw.roles, renamed)),
                       Leaf(rate.node, _rename(rate.roles, renamed)), Leaf(B.node, _rename(B.roles, renamed)),
                       None, 0, bias_leaf, softplus, limit)
    return renamed, disc, state


def _c_leaf(graph: Graph, product: Contraction, h: Node, roles: Roles, renamed: dict[str, str]) -> Leaf:
    C = next(f for f in product.factors if f.node is not h)
    role_of = dict(zip(_labels_of(product, h), roles))
    C_roles = tuple(role_of.get(label, "") if size != 1 else "" for label, size in zip(C.labels, static_shape(C.node)))
    if any(label not in role_of for label in active(C)) or "n" not in C_roles:
        raise NoMatch(C.node, "C does not line up with the state's dims")
    return Leaf(C.node, _rename(C_roles, renamed))


def _with_c(graph: Graph, disc: Discretised, C: Leaf) -> Discretised:
    heads = next(size for size, role in zip(static_shape(disc.x.node), disc.x.roles) if role == "h") \
        if "h" in disc.x.roles else 1
    groups, B, C = grouped_bc(graph, disc.B, C, heads)
    return Discretised(disc.x, disc.dt, disc.A, B, C, groups, disc.dt_bias, disc.softplus, disc.limit)

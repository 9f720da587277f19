"""Roles: which axis of the SSD each dim of a tensor holds, and the checks built on them.

A role is one letter per dim: b batch, l time, c chunk, t step within a chunk, h head, p head
dim, n state, g group of heads; "" marks a unit dim whose role does not matter. A dim may hold
several roles merged in order ("hp": the heads' channels side by side, as Hugging Face's
(b, L, h * p) tensors do).

    down_views    a node's dims followed through views and casts to the tensor under them
    find_chunks   (..., c, t, ...) = reshape(pad(seq, end of time), (..., c * t, ...)) under views: seq, padding
    bind          a contraction's factors are exactly the expected nodes, each label standing for one role
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compiler.passes import NoMatch
from ir.contraction import Contraction, is_regrouping
from ir.graph import Graph, Node
from ir.limits import KERNEL_DTYPES

Roles = tuple  # per dim: a role string ("" for a unit dim)
VIEWS = ("permute", "reshape", "expand", "cast", "identity")
CONTRACTING = ("mul", "einsum", "matmul", "sum", "permute", "reshape", "expand", "cast", "identity")


@dataclass(frozen=True)
class Leaf:
    """A tensor the fused op reads, with the roles of its dims."""

    node: Node
    roles: Roles


def static_shape(node: Node) -> tuple[int, ...]:
    shape = node.type.static_shape() if node.type is not None else None
    if shape is None:
        raise NoMatch(node, "shape is not static")
    return shape


def sole_reader(graph: Graph, node: Node) -> Node | None:
    users = graph.users(node.name)
    return users[0] if len(users) == 1 else None


def climb(graph: Graph, node: Node) -> Node:
    """The last node of the chain of products and views that reads `node` (each the only reader
    of the one before; reshapes only when they keep the dims but unit ones): the root of the
    contraction `node` is a factor of."""
    while (reader := sole_reader(graph, node)) is not None and reader.op in CONTRACTING and _float_like(reader):
        if (reader.op == "mul" and len(reader.inputs) != 2) or (reader.op == "reshape" and is_regrouping(node, reader)):
            break
        node = reader
    return node


def _float_like(node: Node) -> bool:
    return node.type is not None and node.type.dtype in KERNEL_DTYPES + (torch.float64,)


def is_real_cast(node: Node) -> bool:
    """A copy or a cast to a precision the kernels compute in (not float64): looking through loses nothing."""
    return node.op in ("cast", "identity") and bool(node.inputs) and node.type is not None \
        and node.type.dtype in KERNEL_DTYPES


def through_casts(graph: Graph, node: Node) -> Node:
    while is_real_cast(node) and graph.node(node.inputs[0]).type.dtype.is_floating_point:
        node = graph.node(node.inputs[0])
    return node


def same_value(graph: Graph, a: Node, b: Node) -> bool:
    """Do a and b hold the same values: the same node, or the same selects, slices and views of one
    (a loop body that indexes dt[:, t] twice makes two nodes of one tensor)?"""
    return _value_key(graph, a) == _value_key(graph, b)


def _value_key(graph: Graph, node: Node):
    if node.op in ("select", "slice", "reshape", "permute", "expand") and len(node.inputs) == 1:
        return node.op, repr(sorted(node.attrs.items())), _value_key(graph, graph.node(node.inputs[0]))
    return node.name


def down_views(graph: Graph, node: Node, roles: Roles) -> Leaf:
    """The tensor under node's views and casts, its dims' roles carried by position (a unit dim a
    reshape adds or an expand widens takes no role)."""
    while (step := _view_step(graph, node, roles)) is not None:
        node, roles = step
    return Leaf(node, roles)


def _view_step(graph: Graph, node: Node, roles: Roles) -> tuple[Node, Roles] | None:
    """(the view's source, its roles) when node is a view or cast the roles follow through."""
    if node.op not in VIEWS or not node.inputs or (node.op in ("cast", "identity") and not is_real_cast(node)):
        return None
    source = graph.node(node.inputs[0])
    mapped = _view_roles(node, source, roles)
    return None if mapped is None else (source, mapped)


def _view_roles(node: Node, source: Node, roles: Roles) -> Roles | None:
    shape, source_shape = static_shape(node), static_shape(source)
    if node.op in ("cast", "identity"):
        return roles
    if node.op == "permute":
        mapped = [""] * len(roles)
        for k, source_dim in enumerate(node.attrs["perm"]):
            mapped[source_dim] = roles[k]
        return tuple(mapped)
    if node.op == "expand":
        offset = len(shape) - len(source_shape)
        return tuple(roles[k + offset] if size != 1 else "" for k, size in enumerate(source_shape))
    sized = [k for k, size in enumerate(shape) if size != 1]
    source_sized = [k for k, size in enumerate(source_shape) if size != 1]
    if [shape[k] for k in sized] != [source_shape[k] for k in source_sized]:
        return None  # a reshape that regroups dims
    mapped = [""] * len(source_shape)
    for k, k_source in zip(sized, source_sized):
        mapped[k_source] = roles[k]
    return tuple(mapped)


@dataclass(frozen=True)
class Chunked:
    """A sequence cut into chunks: `node` = reshape(pad(seq) or seq) with time split at (time, time + 1)."""

    node: Node
    seq: Node
    time: int  # the time dim of seq (the chunk dim of node)
    chunks: int
    steps: int
    pad: int  # steps of zeros appended to seq


def find_chunks(graph: Graph, node: Node, roles: Roles) -> tuple[Chunked, Roles]:
    """The chunk reshape under node's views (its step dim has role "t", the chunk dim just before it),
    and the roles carried down to that reshape's dims; NoMatch when there is none."""
    while True:
        chunked = _unchunk(graph, node, roles.index("t")) if node.op == "reshape" and "t" in roles else None
        if chunked is not None:
            return chunked, roles
        step = _view_step(graph, node, roles)
        if step is None:
            raise NoMatch(node, "is not a sequence cut into chunks (reshape (..., c * t, ...) -> (..., c, t, ...))")
        node, roles = step


def _unchunk(graph: Graph, node: Node, step_dim: int) -> Chunked | None:
    """node as its sequence cut into chunks along (step_dim - 1, step_dim), else None."""
    shape = static_shape(node)
    source = graph.node(node.inputs[0])
    time = step_dim - 1
    if time < 0 or static_shape(source) != shape[:time] + (shape[time] * shape[step_dim],) + shape[step_dim + 1:]:
        return None
    pad = end_padding(source, time)
    seq = graph.node(source.inputs[0]) if pad is not None else source
    return Chunked(node, seq, time, shape[time], shape[step_dim], pad or 0)


def end_padding(node: Node, dim: int) -> int | None:
    """The zeros F.pad appends along `dim` when that is all it pads; None for anything else."""
    if node.op != "pad" or node.attrs["mode"] != "constant" or node.attrs["value"] != 0:
        return None
    widths = list(node.attrs["pad"]) + [0] * (2 * node.type.rank - len(node.attrs["pad"]))
    at = 2 * (node.type.rank - 1 - dim)
    if widths[at] != 0 or any(width for k, width in enumerate(widths) if k not in (at, at + 1)):
        return None
    return widths[at + 1]


def bind(contraction: Contraction, expected: dict[str, Roles], where: Node) -> dict[str, str]:
    """label -> role, when the contraction's factors are exactly the nodes named in `expected` (with
    the roles of their dims) and every label of a sized dim stands for one role; else NoMatch."""
    found = sorted(factor.node.name for factor in contraction.factors)
    if found != sorted(expected):
        raise NoMatch(where, f"is a product of {found}, not of {sorted(expected)}")
    role_of: dict[str, str] = {}
    for factor in contraction.factors:
        for label, role, size in zip(factor.labels, expected[factor.node.name], static_shape(factor.node)):
            if size == 1:
                continue
            if role == "" or role_of.setdefault(label, role) != role:
                raise NoMatch(factor.node, f"its {role or 'unlabelled'} dim lines up with a "
                                           f"{role_of.get(label, 'different')} dim of another factor")
    if len(set(role_of.values())) != len(role_of):
        raise NoMatch(where, "two dims of one role are not lined up (a product over the wrong dims)")
    return role_of


def out_roles(contraction: Contraction, role_of: dict[str, str], node: Node) -> Roles:
    """The roles of the contraction's result dims (a sized dim no factor has is an error)."""
    roles = []
    for label, size in zip(contraction.out, static_shape(node)):
        if size != 1 and label not in role_of:
            raise NoMatch(node, "broadcasts along a dim no factor has")
        roles.append(role_of.get(label, "") if size != 1 else "")
    return tuple(roles)


def summed_roles(contraction: Contraction, role_of: dict[str, str]) -> set[str]:
    return {role_of[label] for label in contraction.summed}

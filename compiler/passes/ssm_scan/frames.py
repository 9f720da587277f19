"""Frames: which axis of the recurrence each dim of a tensor holds.

The ssm_scan pass reads every tensor around a scan as laid out along the recurrence's axes. A
frame gives, per dim of an IR node, a position: 0, 1, 2 for the dims of the state h (in h's
order), TIME for the sequence axis, None for a unit dim (it broadcasts and needs no role).
Frames flow from a result to its inputs through casts, views (reshape/unsqueeze, permute,
expand), broadcasting muls and einsums that keep every index, e.g. for h of shape (b, d, n):

    exp(dt[:, :, None] * A)  with frame (0, 1, 2):  dt (0, 1),  A (1, 2)

`factor_leaves` collects the factors of a product with their frames, looking only through
nodes nobody else reads; `view_leaf` and `under_views` find the tensor under views and casts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compiler.passes import NoMatch
from ir.graph import Graph, Node
from ir.limits import KERNEL_DTYPES

TIME = 3  # frame position of the time axis; positions 0..2 are the dims of the state h
REAL = KERNEL_DTYPES + (torch.float64,)

Frame = tuple  # per dim of a node: its frame position, or None for a unit dim


@dataclass(frozen=True)
class Leaf:
    """A tensor the fused op reads, with the frame position of each of its dims."""

    node: Node
    frame: Frame

    def same(self, other: Leaf) -> bool:
        return self.node is other.node and self.frame == other.frame


def static_shape(node: Node) -> tuple[int, ...]:
    shape = node.type.static_shape() if node.type is not None else None
    if shape is None:
        raise NoMatch(node, "shape is not static")
    return shape


def unit_free(node: Node, frame: Frame) -> Frame:
    """Size-1 dims carry no role: they broadcast and need no label."""
    return tuple(None if size == 1 else position for size, position in zip(static_shape(node), frame))


def aligned_frame(source: Node, result: Node, frame: Frame) -> Frame | None:
    """Frame of `source` broadcast into `result` (whose dims have `frame`), or None if it does not."""
    source_shape, result_shape = static_shape(source), static_shape(result)
    offset = len(result_shape) - len(source_shape)
    if offset < 0:
        return None
    aligned = []
    for k, size in enumerate(source_shape):
        if size not in (1, result_shape[k + offset]):
            return None
        aligned.append(None if size == 1 else frame[k + offset])
    return tuple(aligned)


def reshaped_frame(source: Node, result: Node, frame: Frame) -> Frame | None:
    """Frame of `source` when result = reshape(source) only adds or drops unit dims."""
    source_shape, result_shape = static_shape(source), static_shape(result)
    kept_source = [k for k, size in enumerate(source_shape) if size != 1]
    kept_result = [k for k, size in enumerate(result_shape) if size != 1]
    if [source_shape[k] for k in kept_source] != [result_shape[k] for k in kept_result]:
        return None
    reshaped = [None] * len(source_shape)
    for k_source, k_result in zip(kept_source, kept_result):
        reshaped[k_source] = frame[k_result]
    return tuple(reshaped)


def permuted_frame(node: Node, frame: Frame) -> Frame:
    permuted = [None] * len(frame)
    for k, source_dim in enumerate(node.attrs["perm"]):
        permuted[source_dim] = frame[k]
    return tuple(permuted)


def einsum_frames(node: Node, frame: Frame) -> list[Frame] | None:
    """Operand frames of an einsum that only multiplies (every index survives); None otherwise."""
    equation = node.attrs["equation"]
    if "->" not in equation or "." in equation:
        return None
    terms, out = equation.split("->")
    terms = terms.split(",")
    if len(terms) != len(node.inputs) or any(len(set(t)) != len(t) or set(t) - set(out) for t in terms):
        return None
    return [tuple(frame[out.index(index)] for index in term) for term in terms]


def is_real_cast(node: Node) -> bool:
    """A copy or a cast to a precision the kernels compute in (fp32) or above: looking through it
    loses nothing. Casts to float64 are not: the kernels would compute them in fp32."""
    return (node.op in ("cast", "identity") and bool(node.inputs) and node.type is not None
            and node.type.dtype in KERNEL_DTYPES)


def through_casts(graph: Graph, node: Node) -> tuple[Node, list[str]]:
    """The node under a chain of float casts and copies, and the chain (outermost first)."""
    chain = []
    while is_real_cast(node) and graph.node(node.inputs[0]).type.dtype in REAL:
        chain.append(node.name)
        node = graph.node(node.inputs[0])
    return node, chain


def _inputs_and_frames(graph: Graph, node: Node, frame: Frame, products: bool):
    """How `node`'s value is built from its inputs, frame by frame: casts and views, and with
    `products` also broadcast muls and index-preserving einsums. None for anything else."""
    inputs = [graph.node(name) for name in node.inputs]
    if is_real_cast(node) and inputs[0].type.dtype in REAL:
        return [(inputs[0], frame)]
    if node.op == "reshape":
        frames = [reshaped_frame(inputs[0], node, frame)]
    elif node.op == "expand":
        frames = [aligned_frame(inputs[0], node, frame)]
    elif node.op == "permute":
        frames = [permuted_frame(node, frame)]
    elif products and node.op == "mul" and node.attrs["scalar"] is None and len(inputs) == 2:
        frames = [aligned_frame(x, node, frame) for x in inputs]
    elif products and node.op == "einsum":
        frames = einsum_frames(node, frame)
    else:
        return None
    if frames is None or any(f is None for f in frames):
        return None
    return list(zip(inputs, frames))


def factor_leaves(graph: Graph, node: Node, frame: Frame, products: bool = True,
                  keep: frozenset = frozenset()) -> tuple[list[Leaf], list[str]]:
    """The factors of the product `node` (or, without `products`, the tensor under its views),
    looking only through nodes nobody else reads, nor into those named in `keep`; and the nodes
    looked through."""
    leaves, through, pending = [], [], [(node, frame, True)]
    while pending:
        current, current_frame, root = pending.pop()
        private = root or (len(graph.nx.succ[current.name]) == 1 and current.name not in keep)
        expanded = _inputs_and_frames(graph, current, current_frame, products) if private else None
        if expanded is None:
            leaves.append(Leaf(current, unit_free(current, current_frame)))
        else:
            through.append(current.name)
            pending.extend((source, source_frame, False) for source, source_frame in reversed(expanded))
    return leaves, through[::-1]


def view_leaf(graph: Graph, node: Node, frame: Frame) -> tuple[Leaf, list[str]]:
    (leaf,), through = factor_leaves(graph, node, frame, products=False)
    return leaf, through


def under_views(graph: Graph, leaf: Leaf) -> Leaf:
    """The tensor under all casts and views of leaf.node."""
    node, frame = leaf.node, leaf.frame
    while (expanded := _inputs_and_frames(graph, node, frame, products=False)) is not None:
        ((node, frame),) = expanded
    return Leaf(node, unit_free(node, frame))

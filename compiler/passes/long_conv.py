"""Long-convolution pass (H3's FlashConv, Hyena, FlashFFTConv): an FFT convolution becomes one kernel.

Recognised (after ir.canonicalize folded the spellings), anchored at each inverse transform:

    y   = irfft(U * K, n=N)[..., :L]          U = rfft(u, n=N), K = rfft(k, n=N) or any other spectrum
        | ifft(U * K, n=N).real[..., :L]      U = fft(u, n=N),  K = fft(k, n=N) or any other spectrum;
                                              .real before or after the slice
    out = post_gate * (y + u * D)             the skip and the gate each optional
    u   = signal * pre_gate                   fused when that product is read only by the pattern

    U * K may be any broadcast product, unit dims added on either side (S4's
    einsum('bhl,chl->bchl', U, K), canonicalised to one): u then serves several filters per
    channel, D holds one weight per output channel (S4's D (C, H)).

    u     (*batch, *channels, L), any strides ((B, L, H) tensors seen transposed); u and k may be
          zero-padded to n first (F.pad(u, (0, L))) instead of passing n. The time dim may also sit
          elsewhere, (B, L, H) transformed along dim=1: every transform, the slice and the filter
          then hold time at that same dim counted from the end, and the op moves it last
    k     (*channels, Lk) with Lk <= L, broadcast over the batch dims: a parameter, or computed per
          call from parameters (Hyena's implicit filter); the op takes its spectrum once per call.
          Where u and k each lack channel dims the other has, the op broadcasts them (the batch
          dims are the leading ones k lacks); either factor may be the signal (convolution commutes)
    D     one weight per channel: (H,) broadcast as (H, 1) or (1, H, 1)
    N     >= L + Lk - 1, so that the circular convolution is the linear one (N = 2L in the papers);
          otherwise (N < L + Lk - 1, N >= L) the op computes the circular convolution of period N
          with k cropped or padded to N taps, as rfft(k, n=N) does: S4's bidirectional filter
          pad(k0, (0, L)) + pad(k1.flip(-1), (L, 0)) of 2L taps

K need not be a transform: a sum of spectra (safari's and M2's bidirectional fftconv_ref,
rfft(k, n) / n + rfft(k_rev, n).conj() / n), a conjugate, a spectrum held as a parameter...
Any complex K with the product's length along time (N // 2 + 1 for irfft, N for ifft) works:
irfft(U * K, N) is the circular convolution of u with the filter irfft(K, N) (ifft(K, N).real
for the complex form), whatever K is, since U is the transform of a real signal. The op reads
that filter, computed per call by a node the pass adds, as a circular filter of period N.

Scales fold into one factor relative to the plain causal convolution: each transform's norm
("backward", "ortho", "forward") and multiplications or divisions by Python numbers on U, K,
their product, the inverse transform or y (Hyena divides K by N and inverts with norm="forward");
numbers applied after the skip scale D too. Casts and copies may sit anywhere: the kernel
computes in fp32 and writes the eager output's dtype and layout. Which factor of U * K is the
signal: a transform with as many steps as the slice keeps; the one the skip reads, else the one
whose filter the most leading (batch) dims share, then the one of the product's shape, then the
longer one.

A candidate that breaks is reported as a near-miss naming the node: an FFT shorter than L, a
slice other than the first L steps (not causal), transforms along different dims, a spectrum
broadcast along time, float64, an intermediate read outside the pattern...
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from compiler.passes import NoMatch, PassContext
from ir.fused import FusedSpec, LongConvLayout, OutputLayout
from ir.graph import Graph, Node
from ir.limits import KERNEL_DTYPES
from ir.match import check_private
from ir.types import TensorType

PATTERN = "long_conv"
FORWARD = {"irfft": "rfft", "ifft": "fft"}
SYMBOLIC_INVERSES = ("fft_irfft", "fft_ifft")  # left opaque by ir.spellings when n is symbolic
COPIES = ("identity", "cast")
FORWARD_NORM_POWER = {"backward": 0.0, "ortho": 0.5, "forward": 1.0}  # a forward transform scales by n^-power
INVERSE_NORM_POWER = {"backward": 1.0, "ortho": 0.5, "forward": 0.0}
WIDE = (torch.float64, torch.complex128)


def fft_conv_reference(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Causal convolution by FFT plus skip, H3 (Fu et al. 2023) eq. 2 / FlashConv:
    y = irfft(rfft(u, n=2L) * rfft(k, n=2L), n=2L)[..., :L] + u * D, for u (B, H, L), k (H, L), D (H,)."""
    seqlen = u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * seqlen) * torch.fft.rfft(k, n=2 * seqlen), n=2 * seqlen)
    return y[..., :seqlen] + u * D[:, None]


@dataclass
class Side:
    """One factor of the spectral product: a forward transform of `input`, times `scale`; or, with no
    transform, a spectrum computed some other way (`input`, a sum of spectra...)."""

    transform: Node | None
    input: Node  # what it transforms, zero-padding at the end of time stepped over; or the spectrum
    scale: float
    nodes: list[str]  # the padding, the transform, then the scalings and views up to the product
    shape: tuple[int, ...]  # where the product reads it, time last


@dataclass
class Spectral:
    """inverse(U * K): the two factors, and the scale of the whole relative to a plain convolution."""

    inverse: Node
    product: Node
    sides: tuple[Side, Side]
    scale: float
    nodes: list[str]  # the product, the scalings after it, the inverse transform
    time: int  # the time dim, counted from the end (-1: last)


@dataclass
class Reading:
    """One way to read the product: which factor transforms the signal u and which the filter k."""

    signal: Side
    filter: Side
    batch_dims: int  # leading dims of the output (time moved last) the filter is broadcast over; the
    #                  op broadcasts u and k over the channel dims after them where either lacks one
    chain: list[tuple[Node, float]]  # the signal transform's input and below through copies and scalings,
    #                                  each with the factor it is scaled by on the way to the transform
    time: int  # the time dim, counted from the end
    out_shape: tuple[int, ...]  # the convolution's, time last: the product's with L steps
    signal_shape: tuple[int, ...]  # u as the product reads it, time last, with out_shape's rank
    filter_lead: tuple[int, ...]  # k's dims before time as the product reads it, with out_shape's rank
    period: int | None  # that of the circular convolution computed, when it is not the linear one

    @property
    def seqlen(self) -> int:
        return self.out_shape[-1]


@dataclass
class Skip:
    """The skip term u * D added to the convolution."""

    D: Node
    source: Node  # the node of the signal chain it multiplies
    reading: Reading
    nodes: list[str]


@dataclass
class Tail:
    """What follows the inverse transform: slice (and .real), scalings, skip, post gate."""

    anchor: Node
    readings: list[Reading]  # those whose signal has as many steps as the slice keeps
    nodes: list[str] = field(default_factory=list)
    conv_scale: float = 1.0  # scalings of y alone
    outer_scale: float = 1.0  # scalings after the skip or the gate: of y and the skip alike
    skip: Skip | None = None
    post_gate: Node | None = None


@dataclass
class Signal:
    """u as the op reads it: the node, the pre-gate split off it, the scalings between it and its transform."""

    u: Node
    pre_gate: Node | None
    scale: float
    nodes: list[str]


def run(graph: Graph, context: PassContext) -> None:
    def try_fuse(node: Node) -> None:
        if node.op in FORWARD:
            _fuse(graph, node, context)
        elif node.op == "torch" and node.attrs["target"] in SYMBOLIC_INVERSES:
            raise NoMatch(node, "the transform length is symbolic (dynamic shapes): the kernel needs a static length")

    context.for_each_candidate(PATTERN, graph, list(graph), try_fuse)


def _fuse(graph: Graph, inverse: Node, context: PassContext) -> None:
    spectral = _spectral(graph, inverse)
    tail = _tail(graph, spectral, _readings(graph, spectral))
    reading = tail.skip.reading if tail.skip else tail.readings[0]
    inside = set(spectral.nodes + reading.signal.nodes + reading.filter.nodes + tail.nodes
                 + (tail.skip.nodes if tail.skip else []))
    signal = _signal(graph, reading, tail, inside)
    check_private(graph, reading.signal.nodes + spectral.nodes[:-1], inside)
    time = spectral.time
    filter_taps = _filter_operand(graph, spectral, reading.filter)
    layout = LongConvLayout(
        batch_dims=reading.batch_dims, has_D=tail.skip is not None, has_pre_gate=signal.pre_gate is not None,
        has_post_gate=tail.post_gate is not None, time=time,
        out=_output_layout(tail.anchor, _rows(reading.out_shape, reading.batch_dims), time),
        signal_dims=_view(signal.u, reading.signal_shape[:-1], time),
        filter_dims=_view(filter_taps, reading.filter_lead, time), period=reading.period)
    replaced = (signal.nodes + reading.filter.nodes + reading.signal.nodes + spectral.nodes
                + (tail.skip.nodes if tail.skip else []) + tail.nodes)
    scale = spectral.scale * signal.scale * tail.conv_scale * tail.outer_scale
    spec = FusedSpec(PATTERN, dict(layout=layout, scale=scale, skip_scale=tail.outer_scale))
    operands = [signal.u, filter_taps]
    operands += [tail.skip.D] if tail.skip else []
    operands += [signal.pre_gate] if signal.pre_gate is not None else []
    operands += [tail.post_gate] if tail.post_gate is not None else []
    detail = f"{inverse.op} n={inverse.attrs['n']}, L={reading.seqlen}: {_describe(layout, scale)}"
    context.fuse(graph, tail.anchor, spec, [node.name for node in operands], replaced, detail)


def _describe(layout: LongConvLayout, scale: float) -> str:
    parts = [name for name, present in (("D skip", layout.has_D), ("pre-gate", layout.has_pre_gate),
                                        ("post-gate", layout.has_post_gate)) if present]
    if layout.period is not None:
        parts.append(f"circular filter of period {layout.period}")
    if scale != 1.0:
        parts.append(f"scale {scale:.6g}")
    return ", ".join(parts) or "plain"


# -- helpers ---------------------------------------------------------------------------------------
def _shape(node: Node, time: int = -1) -> tuple[int, ...]:
    """The static shape of `node`, with the time dim (counted from the end) moved last; a tensor
    without that many dims is first padded with leading 1s, as broadcasting would."""
    shape = node.type.static_shape() if node.type is not None else None
    if shape is None:
        raise NoMatch(node, "its shape is symbolic or it is not a tensor")
    if time == -1:
        return shape
    shape = (1,) * max(0, -time - len(shape)) + tuple(shape)
    return shape[:time] + shape[time + 1:] + (shape[time],)


def _left_padded(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """`shape` with leading 1s up to `rank` dims, as broadcasting reads it."""
    return (1,) * (rank - len(shape)) + tuple(shape)


def _scalar(node: Node) -> float | None:
    """The factor of a multiplication by a real Python number (divisions are canonicalised to these)."""
    scalar = node.attrs.get("scalar") if node.op == "mul" and len(node.inputs) == 1 else None
    return float(scalar) if isinstance(scalar, (int, float)) else None


def _chain(graph: Graph, node: Node, through: Callable[[Node], bool],
           scalars: bool = True) -> list[tuple[Node, float]]:
    """`node`, then the nodes below it through unary nodes `through` accepts (and scalings, when
    `scalars`), each with the product of the scalings between it and `node`."""
    chain, factor = [(node, 1.0)], 1.0
    while True:
        scalar = _scalar(node) if scalars else None
        if scalar is None and not through(node):
            return chain
        factor *= 1.0 if scalar is None else scalar
        node = graph.node(node.inputs[0])
        chain.append((node, factor))


def _is_alias(node: Node) -> bool:
    return node.op == "identity"


def _is_copy(node: Node) -> bool:
    return node.op in COPIES


def _views(graph: Graph, time: int) -> Callable[[Node], bool]:
    """Accepts copies and reshapes that only add or drop unit dims before the time dim."""
    def through(node: Node) -> bool:
        return node.op == "identity" or (node.op == "reshape" and _adds_unit_dims(graph, node, time))

    return through


def _adds_unit_dims(graph: Graph, reshape: Node, time: int) -> bool:
    """Does `reshape` only add or drop unit dims, leaving the dims from the time dim on alone?"""
    shapes = [node.type.static_shape() if node.type is not None else None
              for node in (graph.node(reshape.inputs[0]), reshape)]
    if any(shape is None or len(shape) < -time for shape in shapes):
        return False
    before, after = shapes
    return before[time:] == after[time:] and _sizes_above_one(before[:time]) == _sizes_above_one(after[:time])


def _sizes_above_one(shape: tuple[int, ...]) -> list[int]:
    return [size for size in shape if size != 1]


def _time_dim(transform: Node) -> int:
    """The dim a transform (or the slice) runs along, counted from the end."""
    return transform.attrs["dim"] - len(_shape(transform))


def _check_time_dim(transform: Node, time: int) -> None:
    if _time_dim(transform) != time:
        raise NoMatch(transform, f"{transform.op} along dim {transform.attrs['dim']}, not the time dim of the "
                                 f"inverse transform ({time} from the end)")


def _rows(out_shape: tuple[int, ...], batch_dims: int) -> tuple[int, int, int]:
    return math.prod(out_shape[:batch_dims]), math.prod(out_shape[batch_dims:-1]), out_shape[-1]


def _output_layout(anchor: Node, rows: tuple[int, int, int], time: int) -> OutputLayout:
    """The eager output's layout (time moved last) when the kernel's (B, H, L) rows can view it;
    else contiguous."""
    value = anchor.value.movedim(time, -1)
    layout = OutputLayout.like(value)
    try:
        layout.empty(value.shape, torch.device("meta")).view(rows)
    except RuntimeError:
        return OutputLayout(layout.dtype, tuple(range(len(layout.order))))
    return layout


def _view(node: Node, dims: tuple[int, ...], time: int) -> tuple[int, ...] | None:
    """The dims before time an operand is viewed in (LongConvLayout), None where they are its own."""
    return None if _shape(node, time)[:-1] == dims else dims


def _filter_operand(graph: Graph, spectral: Spectral, side: Side) -> Node:
    """What the op reads as k: the transformed filter, or a node computing the filter of period n
    whose spectrum a non-transform factor is, irfft(K, n) (ifft(K, n).real for the complex form)."""
    if side.transform is not None:
        return side.input
    inverse, spectrum = spectral.inverse, side.input
    attrs = {"n": inverse.attrs["n"], "dim": spectrum.type.rank + spectral.time, "norm": "backward"}
    transform = {"irfft": torch.fft.irfft, "ifft": torch.fft.ifft}[inverse.op]
    value = transform(spectrum.value, n=attrs["n"], dim=attrs["dim"])
    taps = _add(graph, spectral.product, inverse.op, spectrum, attrs, value)
    return taps if inverse.op == "irfft" else _add(graph, spectral.product, "real", taps, {}, value.real)


def _add(graph: Graph, at: Node, op: str, source: Node, attrs: dict, value: torch.Tensor) -> Node:
    """A new node `op(source)` placed where `at` is."""
    node = Node(name=graph.fresh_name(f"{source.name}_{op}"), op=op, inputs=[source.name], attrs=attrs,
                type=TensorType.of(value), value=value, order=at.order)
    return graph.add(node)


# -- the transforms --------------------------------------------------------------------------------
def _spectral(graph: Graph, inverse: Node) -> Spectral:
    """inverse(scalings(scalings(forward(a)) * scalings(forward(b) or another spectrum)))."""
    time = _time_dim(inverse)
    if inverse.type.dtype in WIDE:
        raise NoMatch(inverse, f"{inverse.op} computes in {inverse.type.dtype}; the kernel computes in float32")
    chain = _chain(graph, graph.node(inverse.inputs[0]), _is_alias)
    product, between = chain[-1]
    if product.op != "mul" or len(product.inputs) != 2:
        raise NoMatch(product, f"the input of {inverse.op} is {product.op}, not a product of two spectra")
    sides = tuple(_side(graph, graph.node(name), inverse, time) for name in product.inputs)
    n = inverse.attrs["n"]
    powers = INVERSE_NORM_POWER[inverse.attrs["norm"]] + sum(FORWARD_NORM_POWER[side.transform.attrs["norm"]]
                                                             for side in sides if side.transform is not None)
    scale = n ** (1.0 - powers) * between * sides[0].scale * sides[1].scale
    return Spectral(inverse, product, sides, scale, [node.name for node, _ in chain[::-1]] + [inverse.name], time)


def _side(graph: Graph, node: Node, inverse: Node, time: int) -> Side:
    chain = _chain(graph, node, _views(graph, time))
    bottom, scale = chain[-1]
    nodes = [node.name for node, _ in chain[::-1]]
    if bottom.op != FORWARD[inverse.op]:
        return Side(None, bottom, scale, nodes[1:], _shape(node, time))
    _check_time_dim(bottom, time)
    if bottom.attrs["n"] != inverse.attrs["n"]:
        raise NoMatch(bottom, f"{bottom.op} with n={bottom.attrs['n']} but {inverse.op} with n={inverse.attrs['n']}")
    source, pads = _unpadded(graph, graph.node(bottom.inputs[0]), time)
    return Side(bottom, source, scale, pads + nodes, _shape(node, time))


def _unpadded(graph: Graph, node: Node, time: int) -> tuple[Node, list[str]]:
    """(x, [the pad]) for F.pad(x, (0, p)) with zeros at the end of time (the transform pads to n
    anyway); else (node, [])."""
    attrs = node.attrs
    if node.op != "pad" or attrs["mode"] != "constant" or attrs["value"] != 0:
        return node, []
    widths = list(attrs["pad"]) + [0] * (2 * -time - len(attrs["pad"]))
    at_time = 2 * (-time - 1)
    if widths[at_time] == 0 and widths[at_time + 1] >= 0 and not any(widths[:at_time] + widths[at_time + 2:]):
        return graph.node(node.inputs[0]), [node.name]
    return node, []


def _readings(graph: Graph, spectral: Spectral) -> list[Reading]:
    """The valid (signal, filter) assignments of the two factors, the likelier first: the signal is
    a transform; the filter preferably shared by more leading (batch) dims, then the signal of the
    product's shape (not broadcast), then the longer one."""
    first, second = spectral.sides
    product_shape = _shape(spectral.product, spectral.time)
    pairs = [(signal, filt) for signal, filt in ((first, second), (second, first)) if signal.transform is not None]
    if not pairs:
        expected = FORWARD[spectral.inverse.op]
        raise NoMatch(first.input, f"neither factor of the spectral product is {expected} of a signal: they are "
                                   f"{_op_name(first.input)} and {_op_name(second.input)}")
    readings, failure = [], None
    for signal, filt in pairs:
        try:
            readings.append(_reading(graph, spectral, signal, filt))
        except NoMatch as miss:
            failure = failure or miss
    if not readings:
        raise failure
    return sorted(readings, key=lambda reading: (-reading.batch_dims, reading.signal.shape != product_shape,
                                                 -reading.seqlen))


def _op_name(node: Node) -> str:
    return node.attrs["target"] if node.op == "torch" else node.op


def _reading(graph: Graph, spectral: Spectral, signal: Side, filt: Side) -> Reading:
    u, k, time = signal.input, filt.input, spectral.time
    _check_dtypes(u, filt)
    product_shape = _shape(spectral.product, time)
    seqlen, rank = _shape(u, time)[-1], len(product_shape)
    out_shape = product_shape[:-1] + (seqlen,)
    filter_lead = _left_padded(filt.shape[:-1], rank - 1)
    batch_dims = next((dim for dim, size in enumerate(filter_lead) if size != 1), rank - 1)
    n = spectral.inverse.attrs["n"]
    if n < seqlen:
        raise NoMatch(spectral.inverse, f"n={n} < L={seqlen}: the transform crops the signal")
    if filt.transform is None and _shape(k, time)[-1] != product_shape[-1]:
        raise NoMatch(k, f"the filter's spectrum has {_shape(k, time)[-1]} frequencies, the product "
                         f"{product_shape[-1]}: it is broadcast along time")
    signal_shape = _left_padded(signal.shape[:-1], rank - 1) + (seqlen,)
    return Reading(signal, filt, batch_dims, _chain(graph, u, _is_copy), time, out_shape, signal_shape,
                   filter_lead, _period(filt, seqlen, n, time))


def _check_dtypes(u: Node, filt: Side) -> None:
    """The signal and a transformed filter are real, a filter's spectrum complex."""
    if not u.type.dtype.is_floating_point:
        raise NoMatch(u, f"the signal has dtype {u.type.dtype}; the kernel convolves real tensors")
    k = filt.input
    if filt.transform is not None and not k.type.dtype.is_floating_point:
        raise NoMatch(k, f"the filter has dtype {k.type.dtype}; the kernel convolves real tensors")
    if filt.transform is None and not k.type.dtype.is_complex:
        raise NoMatch(k, f"a factor of the spectral product is {_op_name(k)} of dtype {k.type.dtype}, not a spectrum")


def _period(filt: Side, seqlen: int, n: int, time: int) -> int | None:
    """None when n-point transforms compute the linear convolution (a filter of Lk <= L taps,
    n >= L + Lk - 1); else n, the period of the circular one they compute."""
    taps = _shape(filt.input, time)[-1] if filt.transform is not None else None
    return None if taps is not None and taps <= seqlen and n >= seqlen + taps - 1 else n


# -- after the inverse transform -------------------------------------------------------------------
def _tail(graph: Graph, spectral: Spectral, readings: list[Reading]) -> Tail:
    """Walk up from the inverse transform through single readers: the slice to the first L steps
    (and .real) first, then scalings and copies, at most one skip, then at most one post gate. The
    readings left are those whose signal has the L steps the slice keeps (with n = L, no slice:
    those whose signal has n steps)."""
    inverse = spectral.inverse
    seqlen = readings[0].seqlen
    whole = [reading for reading in readings if reading.seqlen == inverse.attrs["n"]]
    tail, current = Tail(anchor=inverse, readings=whole or readings), inverse
    sliced, cut, real = bool(whole), False, inverse.op == "irfft"
    while True:
        users = graph.users(current.name)
        user = users[0] if len(users) == 1 else None
        done = sliced and real
        if user is None or user.op == "output":
            if done:
                break
            readers = ", ".join(node.name for node in users)
            raise NoMatch(current, f"read by {readers} before the slice to the first L={seqlen} steps")
        if user.op == "slice" and not cut:
            tail.readings = _sliced(user, readings, inverse, spectral.time)
            sliced = cut = True
        elif user.op == "real" and not real:
            real = True
        elif not _extend(graph, tail, user, current, tail.readings, done):
            if done:
                break
            raise NoMatch(user, f"{user.op} between {inverse.op} and the slice to the first L={seqlen} steps")
        tail.nodes.append(user.name)
        current = user
    tail.anchor = current
    return tail


def _extend(graph: Graph, tail: Tail, user: Node, current: Node, readings: list[Reading], done: bool) -> bool:
    """Take `user` into the tail: a scaling or a copy anywhere; once y is sliced (and real), a cast,
    the skip or the post gate, each into a kernel dtype."""
    scalar = _scalar(user)
    if scalar is not None:
        if tail.skip is None and tail.post_gate is None:
            tail.conv_scale *= scalar
        else:
            tail.outer_scale *= scalar
        return True
    if user.op == "identity":
        return True
    if not done or user.type.dtype not in KERNEL_DTYPES:
        return False
    if user.op == "cast":
        return True
    if tail.skip is None and tail.post_gate is None:
        tail.skip = _skip(graph, user, current, readings)
        if tail.skip is not None:
            return True
    if tail.post_gate is None:
        tail.post_gate = _post_gate(graph, user, current)
        return tail.post_gate is not None
    return False


def _sliced(node: Node, readings: list[Reading], inverse: Node, time: int) -> list[Reading]:
    """The readings whose signal has as many steps as the slice `node` keeps of the result's start."""
    attrs, seqlen = node.attrs, readings[0].seqlen
    if _time_dim(node) != time:
        raise NoMatch(node, f"slices dim {attrs['dim']}, not the time dim")
    if attrs["start"] != 0:
        raise NoMatch(node, f"keeps steps {attrs['start']}..{attrs['stop']} of the {inverse.attrs['n']}-point result,"
                            f" not the first L={seqlen}: not a causal convolution")
    kept = [reading for reading in readings if reading.seqlen == attrs["stop"]]
    if attrs["step"] != 1 or not kept:
        raise NoMatch(node, f"keeps [{attrs['start']}:{attrs['stop']}:{attrs['step']}] of the result, "
                            f"not the first L={seqlen} steps")
    return kept


def _other_input(graph: Graph, node: Node, current: Node) -> Node | None:
    """The second tensor operand of a binary `node` that reads `current`, or None."""
    if len(node.inputs) != 2 or node.attrs.get("scalar") is not None or _shape(node) != _shape(current):
        return None
    first, second = node.inputs
    return graph.node(second if first == current.name else first)


def _skip(graph: Graph, add: Node, current: Node, readings: list[Reading]) -> Skip | None:
    """The skip u * D when `add` adds it to the convolution `current` (u on a reading's signal chain)."""
    other = _other_input(graph, add, current) if add.op == "add" else None
    if other is None:
        return None
    chain = _chain(graph, other, _is_copy, scalars=False)
    product = chain[-1][0]
    if product.op != "mul" or len(product.inputs) != 2 or product.attrs["scalar"] is not None:
        return None
    nodes = [node.name for node, _ in chain[::-1]]
    for source_name, weight_name in (product.inputs, product.inputs[::-1]):
        for reading in readings:
            source_chain = _chain(graph, graph.node(source_name), _copies_and_views(graph, reading.time), scalars=False)
            source = source_chain[-1][0]
            if (any(node is source for node, _ in reading.chain) and _per_channel(graph.node(weight_name), reading)
                    and _left_padded(_shape(source_chain[0][0], reading.time), len(reading.out_shape))
                    == reading.signal_shape):
                between = [node.name for node, _ in source_chain[-2::-1]]
                return Skip(graph.node(weight_name), source, reading, between + nodes)
    return None


def _copies_and_views(graph: Graph, time: int) -> Callable[[Node], bool]:
    views = _views(graph, time)
    return lambda node: _is_copy(node) or views(node)


def _per_channel(weight: Node, reading: Reading) -> bool:
    """Does `weight` broadcast against the output as one value per channel (size 1 along L and the
    batch dims)?"""
    if weight.type is None or not weight.type.dtype.is_floating_point:
        return False
    shape, out_shape = _shape(weight, reading.time), reading.out_shape
    if len(shape) > len(out_shape):
        return False
    aligned = _left_padded(shape, len(out_shape))
    channels = zip(aligned[reading.batch_dims:-1], out_shape[reading.batch_dims:-1])
    return aligned[-1] == 1 and set(aligned[:reading.batch_dims]) <= {1} and all(a in (1, o) for a, o in channels)


def _post_gate(graph: Graph, mul: Node, current: Node) -> Node | None:
    """The gate g when `mul` is current * g with g broadcast to current's shape."""
    gate = _other_input(graph, mul, current) if mul.op == "mul" else None
    if gate is None or gate is current or gate.type.dtype not in KERNEL_DTYPES:
        return None
    return gate


# -- the signal ------------------------------------------------------------------------------------
def _signal(graph: Graph, reading: Reading, tail: Tail, inside: set[str]) -> Signal:
    """u: the node the skip reads, else the deepest node of the signal chain in a kernel dtype;
    split into signal * pre_gate when it is a product read only inside the pattern."""
    chain = reading.chain
    if tail.skip is not None:
        index = next(i for i, (node, _) in enumerate(chain) if node is tail.skip.source)
    else:
        usable = [i for i, (node, _) in enumerate(chain) if node.type.dtype in KERNEL_DTYPES]
        index = usable[-1] if usable else len(chain) - 1
    u, scale = chain[index]
    if u.type.dtype not in KERNEL_DTYPES:
        raise NoMatch(u, f"u has dtype {u.type.dtype}; the kernel takes float16, bfloat16 or float32")
    nodes = [node.name for node, _ in chain[:index][::-1]]
    split = _pre_gate(graph, u, inside | set(nodes))
    if split is None:
        return Signal(u, None, scale, nodes)
    return Signal(split[0], split[1], scale, [u.name] + nodes)


def _pre_gate(graph: Graph, product: Node, inside: set[str]) -> tuple[Node, Node] | None:
    """(signal, gate) when `product` = signal * gate (gate broadcast to its shape) is read only inside."""
    if product.op != "mul" or len(product.inputs) != 2 or product.attrs["scalar"] is not None:
        return None
    if any(user.name not in inside for user in graph.users(product.name)):
        return None
    first, second = (graph.node(name) for name in product.inputs)
    for signal, gate in ((first, second), (second, first)):
        if (_shape(signal) == _shape(product) and signal.type.dtype in KERNEL_DTYPES
                and gate.type.dtype in KERNEL_DTYPES):
            return signal, gate
    return None

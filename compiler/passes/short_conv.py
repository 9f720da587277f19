"""Short-convolution pass (Mamba's and Hyena's short filters): a depthwise causal conv1d, and the
activation after it, become one kernel.

Recognised (after ir.canonicalize folded the spellings), anchored at each conv1d:

    y   = conv1d(x, w, b, padding=K-1, groups=C)[..., :L]     nn.Conv1d inlined; the slice also as
                                                               [:, :, :L], [..., :-(K-1)], narrow
        | conv1d(pad(x, (K-1, 0)), w, b, groups=C)             F.pad with zeros, conv1d unpadded
    out = silu(y) | y * sigmoid(y) | relu(y) | gelu(y)        optional (F.silu, nn.SiLU, F.relu, nn.GELU...)

    x   (B, C, L), any strides;  w (C, 1, K) with K in 2..8;  b (C,) or None;  stride 1, dilation 1

Any other conv1d is reported as a near-miss naming what broke: dilation or stride, groups other
than the channel count (not depthwise), a kernel size outside 2..8, padding that is not causal
(padding="same", or the padded output not cut to its first L steps), an output read before the cut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from compiler.passes import NoMatch, PassContext
from ir.fused import FusedSpec, OutputLayout
from ir.graph import Graph, Node
from ir.limits import KERNEL_DTYPES, MAX_SHORT_CONV_WIDTH, MIN_SHORT_CONV_WIDTH

PATTERN = "short_conv"


def causal_depthwise_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The short convolution of H3 (Fu et al. 2023, the shift SSM's K-tap filter), Hyena and Mamba:
    silu(conv1d(x, w, b, padding=K-1, groups=C)[..., :L]) for x (B, C, L), w (C, 1, K)."""
    seqlen, width = x.shape[-1], weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :seqlen])


def run(graph: Graph, context: PassContext) -> None:
    def try_fuse(node: Node) -> None:
        if node.op == "conv1d":
            _fuse(graph, node, context)

    context.for_each_candidate(PATTERN, graph, list(graph), try_fuse)


def _fuse(graph: Graph, conv: Node, context: PassContext) -> None:
    x, weight = graph.node(conv.inputs[0]), graph.node(conv.inputs[1])
    _check_depthwise(conv, x, weight)
    width = _shape(weight)[-1]
    source, y, nodes = _causal(graph, conv, x, width)
    anchor, activation = _activation(graph, y)
    if anchor is not y:
        nodes += [user.name for user in graph.users(y.name) if user is not anchor] + [anchor.name]
    has_bias = conv.attrs["has_bias"]
    spec = FusedSpec(PATTERN, dict(activation=activation, has_bias=has_bias, out=OutputLayout.like(anchor.value)),
                     example=(width,))
    inputs = [source.name, weight.name] + ([conv.inputs[2]] if has_bias else [])
    detail = f"k={width}: {', '.join(['bias'] * has_bias + [activation or 'no activation'])}"
    context.fuse(graph, anchor, spec, inputs, nodes, detail)


def _shape(node: Node) -> tuple[int, ...]:
    shape = node.type.static_shape() if node.type is not None else None
    if shape is None:
        raise NoMatch(node, "its shape is symbolic or it is not a tensor")
    return shape


def _check_depthwise(conv: Node, x: Node, weight: Node) -> None:
    """stride 1, dilation 1, one filter of K in 2..8 taps per channel, kernel dtypes."""
    attrs = conv.attrs
    if len(_shape(x)) != 3:
        raise NoMatch(conv, "the input is not (batch, channels, length)")
    channels, width = _shape(x)[1], _shape(weight)[-1]
    if attrs["stride"] != 1:
        raise NoMatch(conv, f"stride {attrs['stride']}: a causal short convolution has stride 1")
    if attrs["dilation"] != 1:
        raise NoMatch(conv, f"dilation {attrs['dilation']}: the kernel has no dilated taps")
    if attrs["groups"] != channels or _shape(weight) != (channels, 1, width):
        raise NoMatch(conv, f"groups={attrs['groups']} with {channels} channels and weight {_shape(weight)}: "
                            "not depthwise")
    if not MIN_SHORT_CONV_WIDTH <= width <= MAX_SHORT_CONV_WIDTH:
        raise NoMatch(conv, f"kernel size {width} is outside {MIN_SHORT_CONV_WIDTH}..{MAX_SHORT_CONV_WIDTH}")
    if conv.type.dtype not in KERNEL_DTYPES:
        raise NoMatch(conv, f"dtype {conv.type.dtype} is not supported by the kernel (fp16/bf16/fp32)")


def _causal(graph: Graph, conv: Node, x: Node, width: int) -> tuple[Node, Node, list[str]]:
    """(the unpadded input, the causal output y, the nodes from the padding to y)."""
    padding = conv.attrs["padding"]
    if padding == width - 1:
        cut = _first_steps(graph, conv, _shape(x)[-1])
        return x, cut, [conv.name, cut.name]
    if padding in (0, "valid") and x.op == "pad":
        _check_pad(x, width)
        return graph.node(x.inputs[0]), conv, [x.name, conv.name]
    raise NoMatch(conv, f"padding={padding!r}: causal needs padding={width - 1} and a slice to the first L steps, "
                        f"or F.pad(x, ({width - 1}, 0)) and no padding")


def _first_steps(graph: Graph, conv: Node, seqlen: int) -> Node:
    """The slice of the padded output to its first L steps, its only reader."""
    users = graph.users(conv.name)
    if len(users) != 1 or users[0].op != "slice":
        readers = ", ".join(user.name for user in users)
        raise NoMatch(conv, f"the padded output (L + K - 1 steps) is read by {readers}, not only cut to its first L")
    cut = users[0]
    attrs = cut.attrs
    if attrs["dim"] != 2 or attrs["step"] != 1 or attrs["start"] != 0 or attrs["stop"] != seqlen:
        raise NoMatch(cut, f"keeps [{attrs['start']}:{attrs['stop']}:{attrs['step']}] of dim {attrs['dim']}, "
                           f"not the first L={seqlen} steps: not causal")
    return cut


def _check_pad(pad: Node, width: int) -> None:
    widths = pad.attrs["pad"]
    if pad.attrs["mode"] != "constant" or pad.attrs["value"] != 0:
        raise NoMatch(pad, f"pads with mode {pad.attrs['mode']!r}, value {pad.attrs['value']}, not zeros")
    if widths[:2] != (width - 1, 0) or any(widths[2:]):
        raise NoMatch(pad, f"pads {widths}, not ({width - 1}, 0) on the time dim: not causal")


def _activation(graph: Graph, y: Node) -> tuple[Node, str | None]:
    """(act(y), its name in codegen.activations) when y's only reader applies a fused activation
    (SiLU written out as y * sigmoid(y) is canonicalised into silu); else (y, None)."""
    users = graph.users(y.name)
    if len(users) == 1 and users[0].op in ("silu", "relu"):
        return users[0], users[0].op
    if len(users) == 1 and users[0].op == "gelu":
        return users[0], "gelu" if users[0].attrs["approximate"] == "none" else "gelu_tanh"
    return y, None

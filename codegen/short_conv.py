"""Short depthwise causal convolution (Mamba's and Hyena's short filters): spec, rendering, launch
configs, support checks and the PyTorch reference.

One Triton kernel is rendered per ShortConvSpec (filter width K, bias, activation) from
codegen/templates/short_conv.py.jinja. Each program owns a [BLOCK_H channels, BLOCK_L steps]
tile of one batch row and reads K shifted copies of its input tile (the overlap stays in cache):

    acc[h, t] = bias[h] + sum_{j < K} w[h, j] * x[h, t - K + 1 + j]     x = 0 before t = 0, fp32
    out[h, t] = act(acc[h, t])                       act: identity, SiLU, ReLU or GELU (exact or tanh)

That is F.conv1d(x, w[:, None], bias, padding=K - 1, groups=H)[..., :L], optionally followed by
the activation, without the padded (L + K - 1)-long intermediate.

This module does not import triton: loading a generated module does, after runtime.interpret
has chosen between compiled kernels and the interpreter.
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen.activations import REFERENCES
from codegen.render import render
from ir.limits import KERNEL_DTYPES, MAX_GRID_YZ, MAX_SHORT_CONV_WIDTH, MIN_SHORT_CONV_WIDTH

ACTIVATIONS = (None, *REFERENCES)


@dataclass(frozen=True)
class ShortConvSpec:
    """What one rendered kernel is specialised for: filter width K, a bias, the activation."""

    width: int
    has_bias: bool = False
    activation: str | None = None

    def __post_init__(self):
        if not MIN_SHORT_CONV_WIDTH <= self.width <= MAX_SHORT_CONV_WIDTH:
            raise ValueError(f"ShortConvSpec.width must be in {MIN_SHORT_CONV_WIDTH}..{MAX_SHORT_CONV_WIDTH}, "
                             f"got {self.width}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ShortConvSpec.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @classmethod
    def for_args(cls, weight, bias=None, activation=None) -> ShortConvSpec:
        """The spec a short_conv_reference call with these arguments needs."""
        return cls(width=weight.shape[-1], has_bias=bias is not None, activation=activation)


def kernel_name(spec: ShortConvSpec) -> str:
    """e.g. short_conv_k4, short_conv_k3_bias_silu."""
    parts = ["short_conv", f"k{spec.width}"]
    parts += ["bias"] if spec.has_bias else []
    parts += [spec.activation] if spec.activation else []
    return "_".join(parts)


def render_short_conv(spec: ShortConvSpec) -> str:
    """Python source of a module holding the kernel for `spec` and its `launch`."""
    return render("short_conv.py.jinja", name=kernel_name(spec), spec=spec,
                  shapes_doc=inspect.getdoc(short_conv_reference))


def require_spec(rendered: ShortConvSpec, requested: ShortConvSpec) -> None:
    """Raise when a launcher is called with arguments its source was not rendered for."""
    if rendered != requested:
        raise ValueError(f"flashfx: kernel rendered for {rendered} called with arguments needing {requested}")


def _block(n: int, cap: int) -> int:
    """The power of two >= n, at most cap."""
    return min(cap, 1 << max(n - 1, 0).bit_length())


CONFIG_KEYS = ("BLOCK_H", "BLOCK_L", "num_warps")  # what default_config and config_space set


def default_config(x: torch.Tensor) -> dict:
    """Tiles of 2048 elements along the contiguous axis: [4, 512] when time is contiguous
    ((B, H, L) tensors), [64, 32] when channels are ((B, L, H) tensors seen transposed)."""
    _, channels, seqlen = x.shape
    if x.stride(2) == 1 or x.stride(1) != 1:
        block_h, block_l = 4, 512
    else:
        block_h, block_l = 64, 32
    return {"BLOCK_H": _block(channels, block_h), "BLOCK_L": _block(seqlen, block_l), "num_warps": 4}


def config_space() -> list[dict]:
    """Autotuning candidates: [BLOCK_H, BLOCK_L] from 1K to 4K elements x warps {2, 4, 8}."""
    return [{"BLOCK_H": h, "BLOCK_L": l, "num_warps": warps}
            for h, l, warps in itertools.product((1, 4, 16, 64), (32, 128, 512, 1024), (2, 4, 8))
            if 1024 <= h * l <= 4096]


def unsupported_reason(x, weight, bias=None, out=None, activation=None) -> str | None:
    """Why the kernel cannot run this short_conv_reference call, in words for report(); None when it can."""
    given = {name: t for name, t in dict(x=x, weight=weight, bias=bias, out=out).items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        return "operands are on different devices (" + ", ".join(f"{n} on {t.device}" for n, t in given.items()) + ")"
    if devices.pop().type not in ("cuda", "cpu"):
        return f"device {x.device} is neither CUDA nor the CPU (Triton's interpreter)"
    for name, t in given.items():
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; the kernel takes float32, float16 or bfloat16"
    for name, rank in dict(x=3, weight=2, bias=1, out=3).items():
        if name in given and given[name].dim() != rank:
            return f"{name} must have {rank} dimensions, got shape {tuple(given[name].shape)}"
    batch, channels, seqlen = x.shape
    width = weight.shape[1]
    expected = dict(weight=(channels, width), bias=(channels,), out=tuple(x.shape))
    for name, shape in expected.items():
        if name in given and tuple(given[name].shape) != shape:
            return f"{name} has shape {tuple(given[name].shape)}, expected {shape}"
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not fused (only {', '.join(REFERENCES)})"
    if not MIN_SHORT_CONV_WIDTH <= width <= MAX_SHORT_CONV_WIDTH:
        return f"filter width {width} is outside {MIN_SHORT_CONV_WIDTH}..{MAX_SHORT_CONV_WIDTH}"
    if min(batch, channels, seqlen) == 0:
        return "empty tensors (a zero-sized batch, channel or time axis)"
    if batch > MAX_GRID_YZ:
        return f"batch {batch} exceeds the launch grid's limit of {MAX_GRID_YZ}"
    if channels > MAX_GRID_YZ:
        return f"{channels} channels exceed the launch grid's limit of {MAX_GRID_YZ} channel tiles"
    return None


def short_conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """out = act(bias + causal depthwise conv1d(x, weight)), per batch and channel.

    short_conv_reference computes it with F.conv1d; launch runs the fused kernel of one
    ShortConvSpec (which fixes K, the bias and the activation) into out.

        x       (batch, channels, L)    any strides
        weight  (channels, K), K 2..8   nn.Conv1d's (channels, 1, K) weight without its middle axis
        bias    (channels,), or None
        out     (batch, channels, L)    launch: preallocated, any float dtype

    out[b, h, t] = act(bias[h] + sum_j weight[h, j] x[b, h, t - K + 1 + j]) with x = 0 at negative
    times, i.e. F.conv1d(x, weight[:, None], bias, padding=K - 1, groups=channels)[..., :L];
    act is the identity or REFERENCES[activation]. Computes in float32 (float64 for float64
    inputs) and returns x's dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    width, seqlen = weight.shape[1], x.shape[2]
    y = F.conv1d(x.to(compute), weight.to(compute)[:, None, :], None if bias is None else bias.to(compute),
                 padding=width - 1, groups=x.shape[1])[..., :seqlen]
    if activation is not None:
        y = REFERENCES[activation](y)
    return y.to(x.dtype)

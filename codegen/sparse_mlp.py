"""Contextual-sparsity MLP (DejaVu): gather kernels' spec, rendering, configs and PyTorch reference.

A predictor picked K of the F neurons of an MLP (`idx`, shared by the M rows of a batch, as
DejaVu does per decode step); two kernels read only those K rows of W1 and K columns of W2:

    h = act(x @ W1[idx]^T + b1[idx])      kernel 1 (up):   gather GEMV/GEMM, bias and activation fused
    y = h @ W2[:, idx]^T + b2             kernel 2 (down): transposed gather, bias fused

The gated MLP (SwiGLU/GeGLU/ReGLU; Llama's gate_proj, up_proj, down_proj, called w1, w3, w2 in
Meta's code; PowerInfer's and TurboSparse's ReLU-fied models) gathers two row sets in kernel 1,
which reads each x tile once for both and multiplies the two in its epilogue:

    h = act(x @ W1[idx]^T + b1[idx]) * up_act(x @ W3[idx]^T + b3[idx])     up_act: identity, or
                                                                           ReLU for dReLU (TurboSparse)

Both accumulate in fp32 and use `tl.dot` once the row tile BLOCK_M is 16 or more (tensor cores),
a broadcast-multiply-and-sum GEMV below. At decode sizes the output tiles are too few to fill a
GPU, so each kernel may split its reduction over SPLIT programs that meet in an fp32 workspace
(see the template's header). A config is two dicts of meta-parameters, one per kernel:

    {"up":   {"BLOCK_M", "BLOCK_K", "BLOCK_D", "SPLIT_D", "num_warps", "num_stages"},
     "down": {"BLOCK_M", "BLOCK_D", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages"}}

W2 is read by columns. Stored as nn.Linear stores it, (D, F) row-major, the selected columns are
strided; `column_major(w2)` is the same matrix with contiguous columns, the one-time copy that
reads them at full bandwidth (a compiler makes it when the weights are constants).

The reference and the generated `launch` share the reference's docstring.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen.activations import REFERENCES
from codegen.render import render
from ir.limits import KERNEL_DTYPES, MAX_GRID_YZ

ACTIVATIONS = {name: REFERENCES[name] for name in ("relu", "gelu", "gelu_tanh", "silu")}
UP_ACTIVATIONS = {"identity": lambda v: v, **ACTIVATIONS}  # of the gated MLP's up projection
MIN_BLOCK_M = 16  # the smallest row tile a config uses for more than a handful of rows
INDEX_DTYPES = (torch.int32, torch.int64)
GEMV_MAX_ROWS = 8  # larger batches pad their row tile to 16 and use tl.dot
GEMV_PRODUCT_BUDGET = 8192  # elements of one GEMV broadcast product (rows x neurons x dims) per program


@dataclass(frozen=True)
class SparseMLPSpec:
    """What one rendered module is specialised for; dtypes, biases and sizes are launch arguments.

    activation: "relu", "gelu" (exact, with erf), "gelu_tanh" (GELU's tanh approximation) or "silu"
    gated: h = act(gate) * up_act(up) (gated_sparse_mlp_reference) instead of act(up) (sparse_mlp_reference)
    up_activation: the gated MLP's activation of its up projection, "identity" or one of the above
    """

    activation: str
    gated: bool = False
    up_activation: str = "identity"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"SparseMLPSpec.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.up_activation not in (UP_ACTIVATIONS if self.gated else ("identity",)):
            raise ValueError(f"SparseMLPSpec.up_activation {self.up_activation!r} needs gated=True and one of "
                             f"{', '.join(UP_ACTIVATIONS)}")


def kernel_name(spec: SparseMLPSpec) -> str:
    """e.g. sparse_mlp_relu, sparse_mlp_gelu_tanh, sparse_mlp_gated_silu, sparse_mlp_gated_relu_relu (dReLU)."""
    if not spec.gated:
        return f"sparse_mlp_{spec.activation}"
    up = "" if spec.up_activation == "identity" else f"_{spec.up_activation}"
    return f"sparse_mlp_gated_{spec.activation}{up}"


def sparse_mlp_reference(x, w1, b1, w2, b2, idx, *, activation: str, row_mask=None) -> torch.Tensor:
    """y = act(x @ w1[idx]^T + b1[idx]) @ w2[:, idx]^T + b2: the MLP restricted to the neurons idx.

    sparse_mlp_reference computes it in plain PyTorch (DejaVu's gathered form); launch runs the two
    gather kernels of one SparseMLPSpec (which fixes the activation) into out.

        x     (M, D)     any strides
        w1    (F, D)     fc1.weight          b1  (F,) or None
        w2    (D, F)     fc2.weight          b2  (D,) or None
        idx   (K,)       int32/int64, 1 <= K <= F, unique values in [0, F), shared by the M rows
        row_mask (M, F)  or None: each row's own mask, bool or x's dtype, any strides; h[m, j] is
                         multiplied by row_mask[m, idx[j]], or 0 where that is 0 (idx: their union)
        out   (M, D)     launch: preallocated, x's dtype

    x, weights, biases and out share one dtype and device. launch accumulates in fp32 and rounds
    h = act(...) to x's dtype before the second product, as PyTorch does. Indices are not
    range-checked by launch (that would cost a device sync).
    """
    h = ACTIVATIONS[activation](_gathered_projection(x, w1, b1, idx))
    return F.linear(_row_masked(h, row_mask, idx), w2[:, idx], b2)


def gated_sparse_mlp_reference(x, w1, b1, w3, b3, w2, b2, idx, *, activation: str,
                               up_activation: str = "identity", row_mask=None) -> torch.Tensor:
    """y = (act(x @ w1[idx]^T + b1[idx]) * up_act(x @ w3[idx]^T + b3[idx])) @ w2[:, idx]^T + b2:
    the gated MLP (w1 gate_proj, w3 up_proj, w2 down_proj) restricted to the neurons idx.

    gated_sparse_mlp_reference computes it in plain PyTorch; launch runs the two gather kernels of
    one gated SparseMLPSpec (which fixes both activations) into out.

        x     (M, D)     any strides
        w1    (F, D)     gate_proj.weight    b1  (F,) or None
        w3    (F, D)     up_proj.weight      b3  (F,) or None
        w2    (D, F)     down_proj.weight    b2  (D,) or None
        idx   (K,)       int32/int64, 1 <= K <= F, unique values in [0, F), shared by the M rows
        row_mask (M, F)  or None: each row's own mask, bool or x's dtype, any strides; h[m, j] is
                         multiplied by row_mask[m, idx[j]], or 0 where that is 0 (idx: their union)
        out   (M, D)     launch: preallocated, x's dtype

    x, weights, biases and out share one dtype and device. launch accumulates both projections in
    fp32 and rounds their gated product h to x's dtype before the second product (PyTorch rounds
    each of the projections, the activation and the product). Indices are not range-checked by
    launch (that would cost a device sync).
    """
    gate = ACTIVATIONS[activation](_gathered_projection(x, w1, b1, idx))
    h = gate * UP_ACTIVATIONS[up_activation](_gathered_projection(x, w3, b3, idx))
    return F.linear(_row_masked(h, row_mask, idx), w2[:, idx], b2)


def _gathered_projection(x, w, b, idx):
    return F.linear(x, w[idx], None if b is None else b[idx])


def _row_masked(h, row_mask, idx):
    if row_mask is None:
        return h
    keep = row_mask[:, idx]
    return torch.where(keep != 0, h * keep, 0.0)


def render_sparse_mlp(spec: SparseMLPSpec) -> str:
    """Python source of a module holding both kernels for `spec` and their `launch`."""
    reference = gated_sparse_mlp_reference if spec.gated else sparse_mlp_reference
    return render(
        "sparse_mlp.py.jinja",
        name=kernel_name(spec),
        spec=spec,
        shapes_doc=inspect.getdoc(reference),
    )


def unsupported_reason(x, w1, b1, w2, b2, idx, out=None, *, activation: str, w3=None, b3=None,
                       up_activation: str = "identity", row_mask=None) -> str | None:
    """Why the kernels cannot take these operands, in words for report(); None when they can.
    The gated MLP passes its up projection as w3 (and b3)."""
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}"
    if up_activation not in UP_ACTIVATIONS:
        return f"up activation {up_activation!r} is not one of {', '.join(UP_ACTIVATIONS)}"
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not float16, bfloat16 or float32"
    if any(t.dim() != 2 for t in (x, w1, w2, w3) if t is not None):
        shapes = ", ".join(str(tuple(t.shape)) for t in (x, w1, w3, w2) if t is not None)
        return f"x and the weight matrices must be 2-D, got {shapes}"
    (m, d), f = x.shape, w1.shape[0]
    if idx.dim() != 1 or idx.dtype not in INDEX_DTYPES:
        return f"idx must be a 1-D int32/int64 tensor, got {idx.dtype} {tuple(idx.shape)}"
    if not 1 <= idx.shape[0] <= f:
        return f"idx selects {idx.shape[0]} neurons, need 1 <= K <= F = {f}"
    expected = {"w1": (w1, (f, d)), "b1": (b1, (f,)), "w3": (w3, (f, d)), "b3": (b3, (f,)),
                "w2": (w2, (d, f)), "b2": (b2, (d,)), "out": (out, (m, d))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and (tuple(tensor.shape) != shape or tensor.dtype != x.dtype):
            return f"{name} is {tensor.dtype} {tuple(tensor.shape)}, expected {x.dtype} {shape} for x {tuple(x.shape)}"
    if row_mask is not None and (tuple(row_mask.shape) != (m, f) or row_mask.dtype not in (torch.bool, x.dtype)):
        return f"row_mask is {row_mask.dtype} {tuple(row_mask.shape)}, expected bool or {x.dtype} {(m, f)}"
    devices = {t.device for t in (x, w1, b1, w3, b3, w2, b2, idx, row_mask, out) if t is not None}
    if len(devices) > 1:
        return f"operands are on different devices ({', '.join(sorted(map(str, devices)))})"
    if x.shape[0] > MAX_GRID_YZ * MIN_BLOCK_M:  # the row tiles run along the grid's third axis
        return f"{x.shape[0]} rows exceed the launch grid's limit ({MAX_GRID_YZ} row tiles of {MIN_BLOCK_M})"
    return None


def column_major(w2: torch.Tensor) -> torch.Tensor:
    """The same (D, F) matrix with each column contiguous, so kernel 2 reads W2[:, idx] coalesced."""
    return w2.t().contiguous().t()


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _row_tile(m: int) -> int:
    return _pow2(m) if m <= GEMV_MAX_ROWS else min(64, max(16, _pow2(m)))


def _splits(programs: int, reduction_blocks: int, sm_count: int | None) -> int:
    """Largest power-of-two split of the reduction that keeps the grid within two waves (1 on CPU)."""
    split = 1
    while sm_count and split * 2 <= reduction_blocks and programs * split * 2 <= 2 * sm_count:
        split *= 2
    return split


def _kernel_config(m: int, n_out: int, n_red: int, block_out: int, block_red: int,
                   sm_count: int | None, num_warps: int = 4) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, output block, reduction block, split, num_warps, num_stages) for one kernel."""
    block_m = _row_tile(m)
    smallest = 16 if block_m >= 16 else 1  # tl.dot needs every tile side >= 16
    block_out = min(block_out, max(smallest, _pow2(n_out)))
    block_red = min(block_red, max(smallest, _pow2(n_red)))
    programs = math.ceil(n_out / block_out) * math.ceil(m / block_m)
    split = _splits(programs, math.ceil(n_red / block_red), sm_count)
    num_stages = 3 if block_m >= 16 and sm_count else 2
    return block_m, block_out, block_red, split, num_warps, num_stages


# What default_config and config_space set: meta-parameters of the up and down kernels.
CONFIG_KEYS = {"up": ("BLOCK_M", "BLOCK_K", "BLOCK_D", "SPLIT_D", "num_warps", "num_stages"),
               "down": ("BLOCK_M", "BLOCK_D", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")}


def _config(up: tuple, down: tuple) -> dict:
    return {"up": dict(zip(CONFIG_KEYS["up"], up)), "down": dict(zip(CONFIG_KEYS["down"], down))}


def _gemv_narrow(block_m: int, wide: int, products: int = 1) -> int:
    """The narrow tile side that keeps a kernel's GEMV broadcast products (two in a gated up
    kernel) within GEMV_PRODUCT_BUDGET."""
    return max(1, GEMV_PRODUCT_BUDGET // (block_m * wide * products))


def default_config(m: int, d: int, k: int, *, sm_count: int | None = None, gated: bool = False) -> dict:
    """A launch configuration for M rows, model width D and K selected neurons that runs well untuned.

    sm_count None means Triton's interpreter (CPU tensors): big tiles and no splits, so that few
    programs run. On a GPU (sm_count multiprocessors), M <= 8 takes the GEMV path with 512-wide
    rows of W1 and 256-wide rows of W2^T, larger M tl.dot tiles of 64; each kernel then splits
    its reduction until its grid fills about two waves. A gated up kernel holds two products,
    so its GEMV tiles have half the neurons and its tl.dot tiles 32.
    """
    if sm_count is None:
        wide = 128 if m <= GEMV_MAX_ROWS else 64
        return _config(_kernel_config(m, k, d, 64, wide, None), _kernel_config(m, d, k, wide, 64, None))
    products = 2 if gated else 1
    if m <= GEMV_MAX_ROWS:
        block_m = _row_tile(m)
        return _config(
            _kernel_config(m, k, d, min(16, _gemv_narrow(block_m, 512, products)), 512, sm_count),
            _kernel_config(m, d, k, 256, min(64, _gemv_narrow(block_m, 256)), sm_count),
        )
    return _config(_kernel_config(m, k, d, 64 // products, 64, sm_count), _kernel_config(m, d, k, 64, 64, sm_count))


def config_space(m: int, d: int, k: int, *, sm_count: int | None = None, gated: bool = False) -> list[dict]:
    """Autotuning candidates: three tiles per kernel (each with its grid-filling split), all pairs.

    GEMV path (M <= 8): W1 rows 256/512/1024 wide (those that fit the register budget), W2^T rows
    128/256/512 wide, the other side as large as the register budget allows. tl.dot path: 32-128 tiles, 4 or 8 warps. On the
    interpreter (sm_count None) there is nothing to tune: the default config alone.
    """
    if sm_count is None:
        return [default_config(m, d, k)]
    if m <= GEMV_MAX_ROWS:
        block_m = _row_tile(m)
        products = 2 if gated else 1
        up = [(min(16, _gemv_narrow(block_m, wide, products)), wide, 4) for wide in (256, 512, 1024)
              if block_m * wide * products <= GEMV_PRODUCT_BUDGET]
        down = [(wide, min(64, _gemv_narrow(block_m, wide)), 4) for wide in (128, 256, 512)]
    else:
        up = [(32, 64, 4), (64, 64, 4), (64, 128, 8)]
        down = [(64, 64, 4), (128, 64, 8), (64, 128, 4)]
    up_tiles = [_kernel_config(m, k, d, out, red, sm_count, warps) for out, red, warps in up]
    down_tiles = [_kernel_config(m, d, k, out, red, sm_count, warps) for out, red, warps in down]
    return [_config(u, dn) for u in dict.fromkeys(up_tiles) for dn in dict.fromkeys(down_tiles)]

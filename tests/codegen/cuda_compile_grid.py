"""Compile every family's kernels for an H100 (sm_90) without a GPU, at the sizes the GPU runs.

    TRITON_INTERPRET=0 python -m tests.codegen.cuda_compile_grid [family ...] [--markdown]

Each case renders a kernel, launches it on meta tensors inside runtime.cross_compile's
compile_only with the config the runtime picks on an H100 (132 SMs), and prints one JSON line
per compiled kernel (shared memory, registers, spills) or per case that failed to compile.
test_cuda_compile.py runs it in a fresh process; --markdown prints the resource table instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict
from typing import Callable, Iterator

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

from codegen import (attention, attention_backward, attention_decode, long_conv, long_conv_backward,  # noqa: E402
                     short_conv, short_conv_backward, sparse_mlp, ssd_scan, ssd_scan_backward, ssm_scan,
                     ssm_scan_backward)
from runtime.cross_compile import compile_only  # noqa: E402
from runtime.loader import load_source  # noqa: E402

CAPABILITY = 90
H100_SMS = 132
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def meta(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def load(name: Callable, render: Callable, spec):
    module, _ = load_source(name(spec), render(spec))
    return module


# -- cases: (label, thunk that launches) per family ----------------------------------------------


def attention_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    grid = [(dtype, d, causal, "none", 1) for dtype in (BF16, FP16) for d in (64, 128) for causal in (False, True)]
    grid += [(BF16, d, False, mask, 1) for d in (59, 96, 111, 256) for mask in ("bool", "additive")]
    grid += [(BF16, 128, True, "none", 4), (BF16, 64, False, "none", 8), (BF16, 59, True, "none", 1),
             (FP32, 64, True, "additive", 1), (FP32, 128, False, "none", 1), (FP32, 256, False, "bool", 1)]
    for dtype, d, causal, mask, group in grid:
        yield f"{dtype} d{d} causal={causal} mask={mask} group={group}", \
            lambda dtype=dtype, d=d, causal=causal, mask=mask, group=group: _attention(dtype, d, causal, mask, group)
    yield "bf16 d128 causal q 1023 kv 1024", lambda: _attention(BF16, 128, True, "none", 1, q_len=1023, kv_len=1024)
    yield "bf16 d256 causal additive softcap (Gemma 2)", lambda: _attention(BF16, 256, True, "additive", 2, softcap=50.0)
    for d in (64, 128):  # training: the row log-sum-exp stored, dropout on the weights
        yield f"bf16 d{d} causal lse dropout", lambda d=d: _attention(BF16, d, True, "none", 1, training=True)


def _attention(dtype, d, causal, mask, group, q_len=4096, kv_len=4096, batch=4, heads=16, softcap=None,
               training=False):
    spec = attention.AttentionSpec(d, d, mask=mask, causal=causal, softcap=softcap is not None, lse=training,
                                   dropout=training)
    module = load(attention.kernel_name, attention.render_attention, spec)
    q = meta(batch, heads, q_len, d, dtype=dtype)
    k = meta(batch, heads // group, kv_len, d, dtype=dtype)
    masks = {"none": None, "bool": meta(batch, heads, q_len, kv_len, dtype=torch.bool),
             "additive": meta(batch, heads, q_len, kv_len, dtype=dtype)}
    extras = dict(lse=meta(*attention.lse_shape(q.shape), dtype=FP32), dropout_p=0.1,
                  seed=meta(1, dtype=torch.int64)) if training else {}
    module.launch(q, k, k, torch.empty_like(q), scale=d ** -0.5, mask=masks[mask], softcap=softcap, **extras)


def backward_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    """The dq and dkdv kernels of the FlashAttention-2 grid's head dims, masks, GQA, softcap and dropout."""
    grid = [(BF16, attention.AttentionSpec(d, d, causal=causal), 1) for d in (64, 128) for causal in (False, True)]
    grid += [(FP16, attention.AttentionSpec(59, 59, mask="bool"), 1),
             (BF16, attention.AttentionSpec(64, 64, causal=True, dropout=True), 1),
             (BF16, attention.AttentionSpec(128, 128, causal=True, dropout=True), 4),
             (BF16, attention.AttentionSpec(256, 256, mask="additive", causal=True, softcap=True), 2),
             (FP32, attention.AttentionSpec(64, 64, mask="additive", causal=True), 1)]
    for dtype, spec, group in grid:
        for part in attention_backward.PARTS:
            backward = attention_backward.AttentionBackwardSpec(spec, part)
            yield f"{dtype} {attention_backward.kernel_name(backward)} group={group}", \
                lambda dtype=dtype, backward=backward, group=group: _backward(dtype, backward, group)
    additive = attention_backward.AttentionBackwardSpec(attention.AttentionSpec(64, 64, mask="additive"), "dq",
                                                        mask_grad=True)
    yield f"{BF16} {attention_backward.kernel_name(additive)}", lambda: _backward(BF16, additive, 1)


def _backward(dtype, spec, group, length=4096, batch=4, heads=16):
    module = load(attention_backward.kernel_name, attention_backward.render_backward, spec)
    d, forward = spec.forward.head_dim, spec.forward
    q = meta(batch, heads, length, d, dtype=dtype)
    k = meta(batch, heads // group, length, d, dtype=dtype)
    lse, delta = meta(*attention.lse_shape(q.shape), dtype=FP32), meta(batch, heads, length, dtype=FP32)
    masks = {"none": None, "bool": meta(batch, 1, 1, length, dtype=torch.bool),
             "additive": meta(length, length, dtype=dtype)}
    dropout = dict(dropout_p=0.1, seed=meta(1, dtype=torch.int64)) if forward.dropout else {}
    options = dict(scale=d ** -0.5, mask=masks[forward.mask], softcap=30.0 if forward.softcap else None, **dropout)
    if spec.part == "dq":
        dmask = {"dmask": meta(batch, heads, length, length, dtype=FP32)} if spec.mask_grad else {}
        module.launch(q, k, k, q, q, lse, delta, torch.empty_like(q), **options, **dmask)
    else:
        module.launch(q, k, k, q, lse, delta, torch.empty_like(k), torch.empty_like(k), **options)


def decode_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    spec = attention_decode.DecodeSpec
    grid = [(spec(64, 64), BF16, 1, 4096, 1), (spec(128, 128), BF16, 1, 16384, 1), (spec(128, 128), BF16, 1, 8192, 8),
            (spec(256, 256), BF16, 1, 4096, 1), (spec(128, 128, mask="additive"), FP16, 1, 4096, 4),
            (spec(64, 64), FP32, 1, 2048, 1),
            # a 16-token tree on GQA groups of 4, and 4 causal queries with SDPA's empty rows
            (spec(128, 128, mask="bool"), BF16, 16, 8192, 4),
            (spec(96, 96, mask="additive", causal=True, empty_rows_zero=True), BF16, 4, 8192, 8)]
    for spec, dtype, q_len, kv_len, group in grid:
        yield f"{dtype} {attention_decode.kernel_name(spec)} q {q_len} kv {kv_len} group={group}", \
            lambda spec=spec, dtype=dtype, q_len=q_len, kv_len=kv_len, group=group: \
            _decode(spec, dtype, q_len, kv_len, group)


def _decode(spec, dtype, q_len, kv_len, group, batch=8, kv_heads=4):
    module = load(attention_decode.kernel_name, attention_decode.render_decode, spec)
    d = spec.head_dim
    q = meta(batch, kv_heads * group, q_len, d, dtype=dtype)
    k = meta(batch, kv_heads, kv_len, d, dtype=dtype)
    masks = {"none": None, "bool": meta(batch, 1, q_len, kv_len, dtype=torch.bool),
             "additive": meta(batch, 1, q_len, kv_len, dtype=dtype)}
    config = attention_decode.default_config(spec, q_len, kv_len, group=group, kv_rows=batch * kv_heads,
                                             sm_count=H100_SMS, itemsize=q.element_size())
    module.launch(q, k, k, torch.empty_like(q), scale=d ** -0.5, mask=masks[spec.mask],
                  causal_offset=kv_len - q_len, config=config)


def long_conv_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    grid = [(BF16, seqlen, False) for seqlen in (256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)]
    grid += [(BF16, 4096, True), (FP16, 8192, True), (FP32, 1024, True)]
    for dtype, seqlen, fused in grid:
        yield f"{dtype} L {seqlen} D+gates={fused}", \
            lambda dtype=dtype, seqlen=seqlen, fused=fused: _long_conv(dtype, seqlen, fused)


def _long_conv(dtype, seqlen, fused, batch=64, channels=768):
    spec = long_conv.LongConvSpec(has_D=fused, has_pre_gate=fused, has_post_gate=fused)
    module = load(long_conv.kernel_name, long_conv.render_long_conv, spec)
    u = meta(batch, channels, seqlen, dtype=dtype)
    k_f = module.spectrum(meta(channels, seqlen, dtype=dtype), seqlen, precision=long_conv.SPECTRUM_PRECISION[dtype])
    extras = dict(D=meta(channels, dtype=FP32), pre_gate=torch.empty_like(u), post_gate=torch.empty_like(u))
    module.launch(u, k_f, torch.empty_like(u), **(extras if fused else {}))


def long_conv_backward_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    grid = [(BF16, 2048, True), (BF16, 16384, True), (FP32, 1024, False)]  # P 1 and 8; fp32 on the FMA path
    for dtype, seqlen, fused in grid:
        yield f"backward {dtype} L {seqlen} D+gates={fused}", \
            lambda dtype=dtype, seqlen=seqlen, fused=fused: _long_conv_backward(dtype, seqlen, fused)


def _long_conv_backward(dtype, seqlen, fused, batch=8, channels=768):
    spec = long_conv.LongConvSpec(has_D=fused, has_pre_gate=fused, has_post_gate=fused)
    module = load(long_conv_backward.kernel_name, long_conv_backward.render_long_conv_backward, spec)
    u = meta(batch, channels, seqlen, dtype=dtype)
    k_f = long_conv.filter_spectrum(meta(channels, seqlen, dtype=FP32), seqlen)
    dk_f = long_conv_backward.spectrum_grad_buffer(long_conv_backward.batch_splits(batch, channels), k_f)
    extras = dict(D=meta(channels, dtype=FP32), pre_gate=torch.empty_like(u), post_gate=torch.empty_like(u),
                  dpre=torch.empty_like(u), dpost=torch.empty_like(u))
    module.launch(u, k_f, torch.empty_like(u), torch.empty_like(u), dk_f, **(extras if fused else {}),
                  dot_precision=long_conv_backward.dot_precision(dtype, FP32))


def short_conv_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    grid = [(BF16, width, True, "silu") for width in (2, 3, 4, 7)]
    grid += [(BF16, 4, False, None), (FP16, 3, True, "gelu"), (FP32, 4, True, "silu")]
    for dtype, width, bias, activation in grid:
        yield f"{dtype} k{width} bias={bias} {activation}", \
            lambda dtype=dtype, width=width, bias=bias, activation=activation: \
            _short_conv(dtype, width, bias, activation)


def _short_conv(dtype, width, bias, activation, batch=8, channels=1536, seqlen=2048):
    spec = short_conv.ShortConvSpec(width, has_bias=bias, activation=activation)
    module = load(short_conv.kernel_name, short_conv.render_short_conv, spec)
    x = meta(batch, channels, seqlen, dtype=dtype)
    module.launch(x, meta(channels, width, dtype=dtype), torch.empty_like(x),
                  bias=meta(channels, dtype=dtype) if bias else None, activation=activation)


def short_conv_backward_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    for dtype, width, bias, activation in [(BF16, 4, True, "silu"), (FP16, 3, False, None)]:
        yield f"backward {dtype} k{width} bias={bias} {activation}", \
            lambda dtype=dtype, width=width, bias=bias, activation=activation: \
            _short_conv_backward(dtype, width, bias, activation)


def _short_conv_backward(dtype, width, bias, activation, batch=8, channels=1536, seqlen=2048):
    spec = short_conv.ShortConvSpec(width, has_bias=bias, activation=activation)
    module = load(short_conv_backward.kernel_name, short_conv_backward.render_short_conv_backward, spec)
    x = meta(batch, channels, seqlen, dtype=dtype)
    module.launch(x, meta(channels, width, dtype=dtype), torch.empty_like(x), torch.empty_like(x),
                  bias=meta(channels, dtype=dtype) if bias else None, activation=activation)


def sparse_mlp_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    grid = [(BF16, rows, 4096, sparse_mlp.SparseMLPSpec("relu")) for rows in (1, 4, 16, 64)]
    grid += [(BF16, 1, 12288, sparse_mlp.SparseMLPSpec("relu")), (FP16, 16, 8192, sparse_mlp.SparseMLPSpec("gelu")),
             (FP32, 3, 1031, sparse_mlp.SparseMLPSpec("gelu_tanh"))]
    # gated (ReLU-fied Llama-2-7B, d 4096, ffn 11008; SwiGLU; TurboSparse's dReLU)
    grid += [(BF16, rows, 4096, sparse_mlp.SparseMLPSpec("relu", gated=True)) for rows in (1, 4, 16, 64)]
    grid += [(FP16, 1, 4096, sparse_mlp.SparseMLPSpec("silu", gated=True)),
             (BF16, 16, 4096, sparse_mlp.SparseMLPSpec("relu", gated=True, up_activation="relu"))]
    for dtype, rows, d, spec in grid:
        yield f"{dtype} rows {rows} d {d} {sparse_mlp.kernel_name(spec)}", \
            lambda dtype=dtype, rows=rows, d=d, spec=spec: _sparse_mlp(dtype, rows, d, spec)
    for rows in (1, 16):  # a bool mask per row (tokens keeping different neurons)
        yield f"bf16 rows {rows} d 4096 gated relu, row masks", \
            lambda rows=rows: _sparse_mlp(BF16, rows, 4096, sparse_mlp.SparseMLPSpec("relu", gated=True), row_mask=True)


def _sparse_mlp(dtype, rows, d, spec, density=0.1, row_mask=False):
    module = load(sparse_mlp.kernel_name, sparse_mlp.render_sparse_mlp, spec)
    ffn = 11008 if spec.gated else 4 * d
    selected = int(ffn * density)
    x = meta(rows, d, dtype=dtype)
    w2 = sparse_mlp.column_major(meta(d, ffn, dtype=dtype))
    config = sparse_mlp.default_config(rows, d, selected, sm_count=H100_SMS, gated=spec.gated)
    weights, options = [meta(ffn, d, dtype=dtype), meta(ffn, dtype=dtype)], {}
    if row_mask:
        options["row_mask"] = meta(rows, ffn, dtype=torch.bool)
    if spec.gated:  # w3, without a bias
        weights += [meta(ffn, d, dtype=dtype), None]
        options["up_activation"] = spec.up_activation
    module.launch(x, *weights, w2, meta(d, dtype=dtype), meta(selected, dtype=torch.int64), torch.empty_like(x),
                  activation=spec.activation, config=config, **options)


def ssm_scan_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    grid = [(BF16, 16, True, False, False), (FP32, 16, True, False, True), (FP16, 16, False, True, False),
            (BF16, 1, True, False, False), (BF16, 64, True, True, True)]
    for dtype, dstate, fused, grouped, last_state in grid:
        yield f"scan {dtype} n {dstate} D+z+bias={fused} grouped={grouped} last_state={last_state}", \
            lambda dtype=dtype, dstate=dstate, fused=fused, grouped=grouped, last_state=last_state: \
            _scan(dtype, dstate, fused, grouped, last_state)
    for dtype, dstate, fused, grouped, last_state in grid:
        yield f"scan backward {dtype} n {dstate} D+z+bias={fused} grouped={grouped} last_state={last_state}", \
            lambda dtype=dtype, dstate=dstate, fused=fused, grouped=grouped, last_state=last_state: \
            _scan(dtype, dstate, fused, grouped, last_state, backward=True)
    for dtype, dstate, grouped in [(BF16, 16, False), (FP32, 16, True), (FP16, 128, False)]:
        yield f"state update {dtype} n {dstate} grouped={grouped}", \
            lambda dtype=dtype, dstate=dstate, grouped=grouped: _state_update(dtype, dstate, grouped)


def _scan(dtype, dstate, fused, grouped, last_state, backward=False, batch=8, dim=1536, seqlen=2048, groups=2):
    """The forward (for training: with chunk states when `backward`), then the backward."""
    bc = meta(batch, groups, dstate, seqlen, dtype=dtype) if grouped else meta(batch, dstate, seqlen, dtype=dtype)
    spec = ssm_scan.ScanSpec.for_args(bc, D=True if fused else None, z=True if fused else None,
                                      delta_bias=True if fused else None, delta_softplus=fused,
                                      return_last_state=last_state, chunk_states=backward)
    u = meta(batch, dim, seqlen, dtype=dtype)
    extras = dict(D=meta(dim, dtype=FP32), z=torch.empty_like(u), delta_bias=meta(dim, dtype=FP32),
                  delta_softplus=True) if fused else {}
    state = meta(batch, dim, dstate, dtype=FP32) if last_state else None
    chunk_states = meta(batch, dim, seqlen // ssm_scan.CHUNK_LEN, dstate, dtype=FP32) if backward else None
    module = load(ssm_scan.kernel_name, ssm_scan.render_scan, spec)
    module.launch(u, torch.empty_like(u), meta(dim, dstate, dtype=FP32), bc, bc, torch.empty_like(u),
                  last_state=state, chunk_states=chunk_states, **extras)
    if backward:
        module = load(ssm_scan_backward.backward_kernel_name, ssm_scan_backward.render_scan_backward, spec)
        dz = {"dz": torch.empty_like(u)} if fused else {}
        module.launch(u, torch.empty_like(u), meta(dim, dstate, dtype=FP32), bc, bc, torch.empty_like(u), chunk_states,
                      torch.empty_like(u), torch.empty_like(u), dlast_state=state, **extras, **dz)


def _state_update(dtype, dstate, grouped, batch=8, dim=1536, groups=2):
    bc = meta(batch, groups, dstate, dtype=dtype) if grouped else meta(batch, dstate, dtype=dtype)
    spec = ssm_scan.StateUpdateSpec.for_args(bc, D=True, z=True, dt_bias=True, dt_softplus=True)
    module = load(ssm_scan.kernel_name, ssm_scan.render_state_update, spec)
    x = meta(batch, dim, dtype=dtype)
    module.launch(meta(batch, dim, dstate, dtype=FP32), x, torch.empty_like(x), meta(dim, dstate, dtype=FP32),
                  bc, bc, torch.empty_like(x), D=meta(dim, dtype=FP32), z=torch.empty_like(x),
                  dt_bias=meta(dim, dtype=FP32), dt_softplus=True)


def ssd_scan_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    for dtype, dstate, headdim, fused, out in [(BF16, 128, 64, True, BF16), (FP32, 128, 64, False, FP32),
                                               (FP16, 64, 64, True, FP16), (BF16, 256, 128, False, BF16),
                                               (BF16, 128, 64, False, FP32)]:
        yield f"scan {dtype} n {dstate} p {headdim} D+z+bias+states={fused} out {out}", \
            lambda dtype=dtype, dstate=dstate, headdim=headdim, fused=fused, out=out: \
            _ssd(dtype, dstate, headdim, fused, out)
    for dtype, dstate in [(BF16, 128), (FP32, 64)]:
        yield f"state update {dtype} n {dstate}", lambda dtype=dtype, dstate=dstate: _ssd_state_update(dtype, dstate)


def _ssd(dtype, dstate, headdim, fused, out_dtype, batch=2, seqlen=8192, heads=24, groups=1):
    module = load(ssd_scan.kernel_name, ssd_scan.render_scan, ssd_scan.SSDSpec(*(fused,) * 7))
    x = meta(batch, seqlen, heads, headdim, dtype=dtype)
    bc = meta(batch, seqlen, groups, dstate, dtype=dtype)
    extras = dict(D=meta(heads, headdim, dtype=FP32), z=torch.empty_like(x), dt_bias=meta(heads, dtype=FP32),
                  dt_softplus=True, dt_limit=(0.0, float("inf")), initial_state=meta(batch, heads, headdim, dstate),
                  final_state=meta(batch, heads, headdim, dstate)) if fused else {}
    module.launch(x, meta(batch, seqlen, heads, dtype=dtype), meta(batch, seqlen, heads, dtype=FP32), bc, bc,
                  torch.empty_like(x, dtype=out_dtype), **extras)


def ssd_scan_backward_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    """Mamba2-130M's heads (24 of 64, 128 states, one group), 48 in 8 groups, the widest state tiles
    the backward takes (64 x 256, 128 x 128)."""
    for dtype, dstate, headdim, fused, heads, groups in [(BF16, 128, 64, True, 24, 1), (FP32, 128, 64, False, 24, 1),
                                                         (FP16, 64, 64, True, 24, 1), (BF16, 128, 64, False, 48, 8),
                                                         (BF16, 256, 64, True, 24, 1), (BF16, 128, 128, True, 24, 1)]:
        yield f"backward {dtype} n {dstate} p {headdim} h {heads} g {groups} all fused={fused}", \
            lambda dtype=dtype, dstate=dstate, headdim=headdim, fused=fused, heads=heads, groups=groups: \
            _ssd_backward(dtype, dstate, headdim, fused, heads, groups)


def _ssd_backward(dtype, dstate, headdim, fused, heads, groups, batch=2, seqlen=8192):
    spec = ssd_scan.SSDSpec(*(fused,) * 7)
    module = load(ssd_scan_backward.backward_kernel_name, ssd_scan_backward.render_scan_backward, spec)
    x = meta(batch, seqlen, heads, headdim, dtype=dtype)
    bc = meta(batch, seqlen, groups, dstate, dtype=dtype)
    chunk_states = meta(batch, seqlen // ssd_scan_backward.saved_chunk(seqlen), heads, headdim, dstate, dtype=FP32)
    extras = dict(D=meta(heads, headdim, dtype=FP32), z=torch.empty_like(x), dz=torch.empty_like(x),
                  dt_bias=meta(heads, dtype=FP32), dt_softplus=True, dt_limit=(0.0, float("inf")),
                  initial_state=meta(batch, heads, headdim, dstate), dfinal_state=meta(batch, heads, headdim, dstate)
                  ) if fused else {}
    module.launch(x, meta(batch, seqlen, heads, dtype=dtype), meta(batch, seqlen, heads, dtype=FP32), bc, bc,
                  torch.empty_like(x), chunk_states, torch.empty_like(x), **extras)


def _ssd_state_update(dtype, dstate, batch=8, heads=24, headdim=64, groups=1):
    module = load(ssd_scan.kernel_name, ssd_scan.render_state_update, ssd_scan.SSDStateUpdateSpec(*(True,) * 5))
    x, state, bc = meta(batch, heads, headdim, dtype=dtype), meta(batch, heads, headdim, dstate, dtype=FP32), \
        meta(batch, groups, dstate, dtype=dtype)
    module.launch(state, x, meta(batch, heads, dtype=dtype), meta(batch, heads, dtype=FP32), bc, bc, state,
                  torch.empty_like(x), D=meta(heads, headdim, dtype=FP32), z=torch.empty_like(x),
                  dt_bias=meta(heads, dtype=FP32), dt_softplus=True, dt_limit=(0.0, float("inf")))


FAMILIES = {
    "attention": attention_cases, "attention_backward": backward_cases, "attention_decode": decode_cases,
    "long_conv": long_conv_cases,
    "short_conv": short_conv_cases, "sparse_mlp": sparse_mlp_cases, "ssm_scan": ssm_scan_cases,
    "long_conv_backward": long_conv_backward_cases, "short_conv_backward": short_conv_backward_cases,
    "ssd_scan": ssd_scan_cases, "ssd_scan_backward": ssd_scan_backward_cases,
}


def compile_family(family: str) -> Iterator[dict]:
    """One record per kernel compiled (or per case that failed) for `family`."""
    for case, launch in FAMILIES[family]():
        with compile_only(CAPABILITY) as compiled:
            try:
                launch()
            except Exception:
                yield {"family": family, "case": case, "error": traceback.format_exc(limit=-3)}
                continue
        for kernel in compiled:
            yield {"family": family, "case": case, "fits": kernel.fits(CAPABILITY)} | asdict(kernel)


def markdown_row(record: dict) -> str:
    if "error" in record:
        return f"| {record['family']} | {record['case']} | FAILED | | | | | | |"
    blocks = ", ".join(f"{key}={value}" for key, value in record["constants"].items() if key.startswith("BLOCK"))
    return (f"| {record['family']} | {record['case']} | {record['name']} | {blocks} | "
            f"{record['num_warps']}/{record['num_stages']} | {record['shared_bytes'] // 1024} | "
            f"{record['registers']} | {record['spill_bytes']} | {record['tensor_cores']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a resource table instead of JSON lines")
    args = parser.parse_args(argv)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    if args.markdown:
        print("| family | case | kernel | blocks | warps/stages | smem KiB | regs | spill B | tensor cores |")
        print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for family in args.families or FAMILIES:
        for record in compile_family(family):
            failed |= "error" in record or not record["fits"]
            print(markdown_row(record) if args.markdown else json.dumps(record), flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())

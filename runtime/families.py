"""The registry of families: each fused op's declared contract, in one table.

    FAMILIES[spec.op] = Family(op, custom_ops, forward, backward)
        op          the runtime FusedOp class compiler.lower builds from a FusedSpec's params
        custom_ops  the torch.ops.flashfx ops it calls (its library_op), each with its number of outputs
        forward     the Templates of the kernels its forward launches
        backward    those its backward launches in training (none: the reference recomputed under autograd)

    Template(prefix, spec, kernel_name, render, config_keys, default_config, config_space,
             unsupported_reason, reference)
        one Jinja template of codegen/: the frozen spec a kernel is rendered from and its name, the
        renderer, the launch configs (the keys a config holds, the heuristic default, the candidates
        max-autotune benchmarks), why a call cannot run it, and the PyTorch reference it must match

A kernel's name starts with its template's prefix: runtime.autotune checks a stored config
against the config keys of the template with the longest prefix of the kernel's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from codegen import (attention, attention_backward, attention_decode, long_conv, long_conv_backward, short_conv,
                     short_conv_backward, sparse_mlp, ssd_scan, ssd_scan_backward, ssm_scan, ssm_scan_backward)
from runtime import library
from runtime.attention import AttentionOp, EncoderLayerOp, MultiheadAttentionOp
from runtime.dispatch import FusedOp
from runtime.long_conv import LongConvOp, ShortConvOp
from runtime.sparse_mlp import SparseMLPOp
from runtime.ssd_scan import SSDScanOp, SSDStateUpdateOp
from runtime.ssm_scan import SelectiveScanOp, StateUpdateOp


@dataclass(frozen=True, eq=False)
class Template:
    prefix: str
    spec: type
    kernel_name: Callable
    render: Callable
    config_keys: tuple | dict
    default_config: Callable
    config_space: Callable
    unsupported_reason: Callable
    reference: Callable


@dataclass(frozen=True, eq=False)
class Family:
    op: type[FusedOp]
    custom_ops: dict[str, int]
    forward: tuple[Template, ...]
    backward: tuple[Template, ...] = ()


ATTENTION = Template("attention", attention.AttentionSpec, attention.kernel_name, attention.render_attention,
                     attention.CONFIG_KEYS, attention.default_config, attention.config_space,
                     attention.unsupported_reason, attention.attention_reference)
ATTENTION_DECODE = Template("attention_decode", attention_decode.DecodeSpec, attention_decode.kernel_name,
                            attention_decode.render_decode, attention_decode.CONFIG_KEYS,
                            attention_decode.default_config, attention_decode.config_space,
                            attention.unsupported_reason, attention.attention_reference)
ATTENTION_BACKWARD = Template("attention_bwd", attention_backward.AttentionBackwardSpec, attention_backward.kernel_name,
                              attention_backward.render_backward, attention_backward.CONFIG_KEYS,
                              attention_backward.default_config, attention_backward.config_space,
                              attention.unsupported_reason, attention_backward.attention_backward_reference)
LONG_CONV = Template("long_conv", long_conv.LongConvSpec, long_conv.kernel_name, long_conv.render_long_conv,
                     long_conv.CONFIG_KEYS, long_conv.default_config, long_conv.config_space,
                     long_conv.unsupported_reason, long_conv.long_conv_reference)
LONG_CONV_BACKWARD = Template("long_conv_backward", long_conv.LongConvSpec, long_conv_backward.kernel_name,
                              long_conv_backward.render_long_conv_backward, long_conv.CONFIG_KEYS,
                              long_conv.default_config, long_conv.config_space, long_conv.unsupported_reason,
                              long_conv_backward.long_conv_backward_reference)
SHORT_CONV = Template("short_conv", short_conv.ShortConvSpec, short_conv.kernel_name, short_conv.render_short_conv,
                      short_conv.CONFIG_KEYS, short_conv.default_config, short_conv.config_space,
                      short_conv.unsupported_reason, short_conv.short_conv_reference)
SHORT_CONV_BACKWARD = Template("short_conv_backward", short_conv.ShortConvSpec, short_conv_backward.kernel_name,
                               short_conv_backward.render_short_conv_backward, short_conv.CONFIG_KEYS,
                               short_conv.default_config, short_conv.config_space, short_conv.unsupported_reason,
                               short_conv_backward.short_conv_backward_reference)
SPARSE_MLP = Template("sparse_mlp", sparse_mlp.SparseMLPSpec, sparse_mlp.kernel_name, sparse_mlp.render_sparse_mlp,
                      sparse_mlp.CONFIG_KEYS, sparse_mlp.default_config, sparse_mlp.config_space,
                      sparse_mlp.unsupported_reason, sparse_mlp.sparse_mlp_reference)
SSM_SCAN = Template("ssm_scan", ssm_scan.ScanSpec, ssm_scan.kernel_name, ssm_scan.render_scan, ssm_scan.CONFIG_KEYS,
                    ssm_scan.default_config, ssm_scan.config_space, ssm_scan.unsupported_reason,
                    ssm_scan.selective_scan_reference)
SSM_SCAN_BACKWARD = Template("ssm_scan_backward", ssm_scan.ScanSpec, ssm_scan_backward.backward_kernel_name,
                             ssm_scan_backward.render_scan_backward, ssm_scan.CONFIG_KEYS,
                             ssm_scan_backward.backward_default_config, ssm_scan_backward.backward_config_space,
                             ssm_scan.unsupported_reason, ssm_scan_backward.selective_scan_backward_reference)
SSM_STATE_UPDATE = Template("ssm_state_update", ssm_scan.StateUpdateSpec, ssm_scan.kernel_name,
                            ssm_scan.render_state_update, ssm_scan.STATE_UPDATE_CONFIG_KEYS, ssm_scan.default_config,
                            ssm_scan.config_space, ssm_scan.state_update_unsupported_reason,
                            ssm_scan.state_update_reference)
SSD_SCAN = Template("ssd_scan", ssd_scan.SSDSpec, ssd_scan.kernel_name, ssd_scan.render_scan, ssd_scan.CONFIG_KEYS,
                    ssd_scan.default_config, ssd_scan.config_space, ssd_scan.unsupported_reason,
                    ssd_scan.ssd_scan_reference)
SSD_SCAN_BACKWARD = Template("ssd_scan_backward", ssd_scan.SSDSpec, ssd_scan_backward.backward_kernel_name,
                             ssd_scan_backward.render_scan_backward, ssd_scan_backward.BACKWARD_CONFIG_KEYS,
                             ssd_scan_backward.backward_default_config, ssd_scan_backward.backward_config_space,
                             ssd_scan_backward.backward_unsupported_reason,
                             ssd_scan_backward.ssd_scan_backward_reference)
SSD_STATE_UPDATE = Template("ssd_state_update", ssd_scan.SSDStateUpdateSpec, ssd_scan.kernel_name,
                            ssd_scan.render_state_update, ssd_scan.STATE_UPDATE_CONFIG_KEYS, ssd_scan.default_config,
                            ssd_scan.config_space, ssd_scan.state_update_unsupported_reason,
                            ssd_scan.ssd_state_update_reference)

FAMILIES = {
    "attention": Family(AttentionOp, {"attention": 1}, (ATTENTION, ATTENTION_DECODE), (ATTENTION_BACKWARD,)),
    "multihead_attention": Family(MultiheadAttentionOp, {"multihead_attention": 1}, (ATTENTION, ATTENTION_DECODE),
                                  (ATTENTION_BACKWARD,)),
    "transformer_encoder_layer": Family(EncoderLayerOp, {"transformer_encoder_layer": 1},
                                        (ATTENTION, ATTENTION_DECODE)),
    "long_conv": Family(LongConvOp, {"long_conv": 1}, (LONG_CONV,), (LONG_CONV_BACKWARD,)),
    "short_conv": Family(ShortConvOp, {"short_conv": 1}, (SHORT_CONV,), (SHORT_CONV_BACKWARD,)),
    "sparse_mlp": Family(SparseMLPOp, {"sparse_mlp": 1}, (SPARSE_MLP,)),
    "ssm_scan": Family(SelectiveScanOp, {"ssm_scan": 1, "ssm_scan_with_state": 2}, (SSM_SCAN,), (SSM_SCAN_BACKWARD,)),
    "ssm_state_update": Family(StateUpdateOp, {"ssm_state_update": 2}, (SSM_STATE_UPDATE,)),
    "ssd_scan": Family(SSDScanOp, {"ssd_scan": 1, "ssd_scan_with_state": 2}, (SSD_SCAN,), (SSD_SCAN_BACKWARD,)),
    "ssd_state_update": Family(SSDStateUpdateOp, {"ssd_state_update": 2}, (SSD_STATE_UPDATE,)),
}
TEMPLATES = sorted(dict.fromkeys(template for family in FAMILIES.values()
                                 for template in family.forward + family.backward),
                   key=lambda template: -len(template.prefix))  # longest prefix first


def template_of(kernel: str) -> Template | None:
    """The template kernel `kernel` was rendered from, by the longest prefix of its name."""
    return next((template for template in TEMPLATES if kernel == template.prefix
                 or kernel.startswith(template.prefix + "_")), None)


def _define_custom_ops() -> None:
    for family in FAMILIES.values():
        for name, outputs in family.custom_ops.items():
            library.define(name, outputs)


_define_custom_ops()

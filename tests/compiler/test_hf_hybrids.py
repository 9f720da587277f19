"""Hugging Face's Mamba-2 hybrids (random init, tiny configs, PyTorch paths) fuse every SSD layer and
every attention layer, and their logits obey the tolerance rule against fp64.

Each model has one Mamba-2 layer and one attention layer (Falcon-H1 runs both in every layer; Zamba2's
hybrid layer adds a shared attention block to its Mamba layer), chunks of 8 over 19 tokens (three
chunks, the last one padded), 2 groups of B and C. GraniteMoeHybrid's MoE runs its eager experts
(torch's grouped_mm has no float64 for the reference).
"""
from __future__ import annotations

import copy

import pytest
import torch

import compiler
from tests.numerics import assert_close_by_rule

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              attn_implementation="eager")
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8)


def bamba():
    config = transformers.BambaConfig(**COMMON, **MAMBA, num_hidden_layers=2, attn_layer_indices=[1])
    return transformers.BambaForCausalLM(config)


def zamba2():
    config = transformers.Zamba2Config(**COMMON, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"],
                                       n_mamba_heads=4, mamba_d_state=8, mamba_ngroups=2, chunk_size=8,
                                       use_mamba_kernels=False)
    return transformers.Zamba2ForCausalLM(config)


def nemotron_h():
    config = transformers.NemotronHConfig(**COMMON, layers_block_type=["mamba", "attention"], head_dim=8,
                                          mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
                                          chunk_size=8, use_mamba_kernels=False)
    return transformers.NemotronHForCausalLM(config)


def falcon_h1():
    config = transformers.FalconH1Config(**COMMON, **MAMBA, num_hidden_layers=1, mamba_d_ssm=64)
    return transformers.FalconH1ForCausalLM(config)


def granite_moe_hybrid():
    config = transformers.GraniteMoeHybridConfig(**COMMON, **MAMBA, num_hidden_layers=2,
                                                 layer_types=["mamba", "attention"], num_local_experts=2,
                                                 num_experts_per_tok=1, shared_intermediate_size=32,
                                                 experts_implementation="eager")
    return transformers.GraniteMoeHybridForCausalLM(config)


HYBRIDS = {  # factory -> (SSD layers, attention layers)
    bamba: (1, 1), zamba2: (2, 1), nemotron_h: (1, 1), falcon_h1: (1, 1), granite_moe_hybrid: (1, 1),
}


@pytest.mark.parametrize("factory", HYBRIDS, ids=lambda factory: factory.__name__)
def test_hybrid_fuses_ssd_and_attention(factory):
    torch.manual_seed(0)
    model = factory().eval()
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    compiled = compiler.compile(copy.deepcopy(model))
    with torch.no_grad():
        ours = compiled(ids).logits
        baseline, reference = model(ids).logits, copy.deepcopy(model).double()(ids).logits
    ssd, attention = HYBRIDS[factory]
    assert (compiled.patterns.count("ssd_scan"), compiled.patterns.count("attention")) == (ssd, attention), \
        compiled.report()
    assert_close_by_rule(ours, baseline, reference)

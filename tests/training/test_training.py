"""Training through fused ops: what the forward saves for backward, and AdamW loops against eager.

Attention's backward kernels (FlashAttention-2) recompute the weights from the saved q, k, v, the
output and the row log-sum-exp, O(B*H*L*d), where eager's naive attention saves the L x L
probabilities; the loss of every step stays within the tolerance rule of eager's, against an fp64
run, with no op falling back to PyTorch (other families recompute their reference in the backward).
"""
from __future__ import annotations

import copy

import pytest
import torch

import compiler
from benchmarks.common import saved_bytes
from models import gpt
from tests.compiler.test_attention_pass import NaiveCausal, qkv
from tests.numerics import assert_close_by_rule


def test_attention_saves_linear_not_quadratic_bytes():
    """q, k, v, O and the row log-sum-exp (two fp32 terms per row): O(B*H*L*d), not O(L^2)."""
    batch, heads, length, head_dim = 1, 2, 256, 16
    q, k, v = (t.requires_grad_() for t in qkv(batch, heads, length, length, head_dim))
    compiled = compiler.compile(NaiveCausal(), strict=True)
    ours = saved_bytes(lambda: compiled(q, k, v))
    eager = saved_bytes(lambda: NaiveCausal()(q, k, v))
    lse = batch * heads * 2 * length * 4
    assert compiled.patterns == ["attention"]
    assert ours == 4 * q.nbytes + lse
    assert eager >= 3 * q.nbytes + batch * heads * length * length * 4  # fp32 probabilities at least


def hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    return model, (torch.randint(0, 128, (2, 16)),), lambda model, ids: model(input_ids=ids, use_cache=False).logits


def gpt_case(build):
    def case():
        model, (ids,) = build(batch=2, length=32)
        return model, (ids,), lambda model, ids: model(ids)
    return case


MODELS = {"gpt_naive": gpt_case(gpt.tiny_naive), "gpt_sdpa_gqa": gpt_case(gpt.tiny_sdpa_gqa), "llama": hf_llama}
STEPS = 20


def losses(model, ids, logits_of, steps: int = STEPS) -> torch.Tensor:
    """The loss of each of `steps` AdamW steps of next-token prediction on `ids`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        logits = logits_of(model, ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.detach())
    return torch.stack(history)


@pytest.mark.parametrize("name", MODELS)
def test_adamw_loop_matches_eager_step_by_step(name):
    model, (ids,), logits_of = MODELS[name]()
    model.train()
    reference = losses(copy.deepcopy(model).double(), ids, logits_of).float()
    baseline = losses(copy.deepcopy(model), ids, logits_of)
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    ours = losses(compiled, ids, logits_of)
    assert "attention" in compiled.patterns, compiled.report()
    assert "ran in PyTorch" not in compiled.report(), compiled.report()  # backward kernels, not a recompute
    assert ours[-1] < ours[0]
    assert_close_by_rule(ours, baseline, reference)

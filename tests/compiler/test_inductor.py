"""flashfx composed with Inductor (compile(model, inductor=True)): the fused ops stay flashfx's, the
rest is compiled by Inductor, outputs and gradients match eager.

A focused set (Inductor's C++ backend compiles slowly on the CPU): Hugging Face GPT-2 and Llama, the
bundled Mamba, Hyena and DejaVu models, training through a GPT, and torch.compile(backend="flashfx")
with the same option. The rest of the suite runs the eager rest (the CPU default).
"""
from __future__ import annotations

import pytest
import torch

import compiler
from models import dejavu, gpt, hyena, mamba
from tests.compiler.test_hf_models import gpt2, llama

transformers = pytest.importorskip("transformers")


def hf(build, implementation: str):
    def example():
        torch.manual_seed(0)
        model = build(implementation).eval()
        return model, (torch.randint(0, 128, (2, 24)),)
    return example


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else (out.last_hidden_state if hasattr(out, "last_hidden_state") else out)


MODELS = {  # name -> (() -> (model, args), the patterns flashfx fuses)
    "gpt2_eager": (hf(gpt2, "eager"), {"attention"}),
    "llama_sdpa": (hf(llama, "sdpa"), {"attention"}),
    "mamba": (mamba.tiny, {"ssm_scan", "short_conv"}),
    "hyena": (hyena.tiny, {"long_conv", "short_conv"}),
    "dejavu": (dejavu.tiny_gathered, {"sparse_mlp", "attention"}),
}


@pytest.mark.parametrize("name", MODELS)
def test_fused_ops_survive_inductor(name):
    build, patterns = MODELS[name]
    model, args = build()
    model.eval()
    compiled = compiler.compile(model, inductor=True, strict=True)
    with torch.no_grad():
        ours, eager = logits(compiled(*args)), logits(model(*args))
    assert set(compiled.patterns) == patterns, compiled.report()
    assert "Inductor compiled the rest of" in compiled.report()
    assert "ran in PyTorch" not in compiled.report()
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-4)


def test_training_through_inductor_matches_eager():
    model, (ids,) = gpt.tiny_naive(batch=2, length=32)
    compiled = compiler.compile(model, inductor=True, strict=True)

    def gradients(run):
        model.zero_grad()
        loss = run(ids).float().pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ours, our_grads = gradients(compiled)
    eager, eager_grads = gradients(model)
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-5)
    for grad, expected in zip(our_grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    assert compiled.patterns == ["attention", "attention"]
    assert "ran in PyTorch" not in compiled.report(), compiled.report()  # the backward kernels ran


def test_torch_compile_backend_takes_the_same_option():
    model, (ids,) = gpt.tiny_sdpa_gqa(batch=1, length=16)
    model.eval()
    torch._dynamo.reset()
    ours = torch.compile(model, backend="flashfx", options={"inductor": True})
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids), rtol=1e-4, atol=1e-4)
    from compiler.backend import default_backend
    assert "Inductor compiled the rest of" in default_backend.report.render()


def test_unknown_backend_option_is_an_error():
    model, (ids,) = gpt.tiny_sdpa_gqa(batch=1, length=8)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="options are 'inductor', 'rolled' and 'cudagraphs' only"):
        torch.compile(model, backend="flashfx", options={"inductr": True})(ids)

"""torch.compile(model, backend="flashfx") and compiler.compile share one pipeline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compiler
from compiler.backend import default_backend
from models.gpt import GPT, GPTConfig


def test_torch_compile_backend_name():
    model = GPT(GPTConfig.tiny(attention="sdpa")).eval()
    ids = torch.randint(0, 96, (2, 21))
    fused_before = len(default_backend.report.fused)
    with torch.no_grad():
        ours = torch.compile(model, backend="flashfx")(ids)
        eager = model(ids)
    torch.testing.assert_close(ours, eager, atol=2e-5, rtol=2e-5)
    assert len(default_backend.report.fused) - fused_before == model.config.n_layer


def test_new_shape_recompiles_and_stays_correct():
    model = GPT(GPTConfig.tiny()).eval()
    compiled = compiler.compile(model)
    with torch.no_grad():
        for length in (7, 30):
            ids = torch.randint(0, 96, (1, length))
            torch.testing.assert_close(compiled(ids), model(ids), atol=2e-5, rtol=2e-5)
    assert compiled.patterns.count("attention") == 2 * model.config.n_layer


def test_graph_break_runs_rest_eagerly():
    class Breaks(torch.nn.Module):
        def forward(self, q, k, v):
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            print_value = float(y.sum())  # forces a graph break
            return torch.nn.functional.scaled_dot_product_attention(y, k, v) + print_value

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    compiled = compiler.compile(Breaks())
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), Breaks()(q, k, v), atol=2e-5, rtol=2e-5)
    assert compiled.patterns.count("attention") == 2


def test_recompile_limit_is_reported():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    model, compiled = Attention(), compiler.compile(Attention())
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for length in (3, 4, 5, 6):
            q, k, v = (torch.randn(1, 2, length, 8) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-5)
    assert compiled.patterns.count("attention") == 2
    assert "TorchDynamo hit its recompile limit (config.recompile_limit)" in compiled.report()



FRESH_PROCESS = """
import compiler, torch
from models.gpt import GPT, GPTConfig
model = GPT(GPTConfig.tiny()).eval()
compiled = compiler.compile(model)
with torch.no_grad():
    compiled(torch.randint(0, 96, (1, 9)))
print(compiled.report())
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run the interpreter only on machines without CUDA")
def test_kernels_run_through_the_interpreter_in_a_fresh_process():
    """Importing flashfx must not import Triton before the interpreter is decided (runtime.interpret):
    every kernel would fall back to PyTorch, correct but never run."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, check=True,
                            env=environment, cwd=Path(__file__).parents[2])
    assert "attention" in result.stdout and "ran in PyTorch" not in result.stdout, result.stdout


def test_state_dict_round_trips_with_the_models_keys():
    model = GPT(GPTConfig.tiny()).eval()
    compiled = compiler.compile(model)
    assert compiled.state_dict().keys() == model.state_dict().keys()
    trained = GPT(GPTConfig.tiny()).eval()
    compiled.load_state_dict(trained.state_dict())
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), trained(ids), atol=2e-5, rtol=2e-5)


def test_model_attributes_are_reachable_through_the_compiled_module():
    model = GPT(GPTConfig.tiny()).eval()
    compiled = compiler.compile(model)
    assert compiled.config is model.config
    with pytest.raises(AttributeError):
        compiled.no_such_attribute

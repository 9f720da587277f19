"""Known scan loops kept rolled by default (compiler.known_scans): transformers' Mamba, FalconMamba and
Jamba, and mamba_ssm's selective_scan_ref (a stand-in module here), held to the tolerance rule against
eager and fp64 in prefill, in decode with a cache and in training; the opt-outs, other backends, and
the report's note on a long unrolled loop."""
from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch
from torch import nn

import compiler
from compiler import known_scans
from compiler.backend import default_backend
from compiler.passes.ssm_scan import recurrence
from runtime.rolled import key_of
from tests.numerics import assert_close_by_rule

transformers = pytest.importorskip("transformers")
from transformers.models.mamba.modeling_mamba import mamba_selective_scan  # noqa: E402

LAYERS = 2


def hugging_face(family: str, associative: bool = True, layers: int = LAYERS) -> nn.Module:
    """A tiny Mamba, FalconMamba (B, C and Δ RMS-normalised) or Jamba (a Mamba layer, then attention
    and a mixture of experts)."""
    torch.manual_seed(0)
    if family == "jamba":
        config = transformers.JambaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4,
            use_associative_scan=associative, experts_implementation="eager")  # grouped_mm has no float64
        return transformers.JambaForCausalLM(config).eval()
    config_type, model_type = {
        "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM),
        "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM)}[family]
    config = config_type(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=layers,
                         use_associative_scan=associative)
    return model_type(config).eval()


def mamba_layers(model: nn.Module) -> list[int]:
    return [layer for layer, kind in enumerate(model.config.layer_types) if kind != "full_attention"]


def assert_caches_close(layers: list[int], ours, baseline, reference) -> None:
    """The SSM and convolution states of every Mamba layer, within the rule."""
    for layer in layers:
        for state in ("get_recurrent_state", "get_conv_state"):
            assert_close_by_rule(*(getattr(cache, state)(layer) for cache in (ours, baseline, reference)))


@pytest.mark.parametrize("family, associative", [("mamba", True), ("falcon_mamba", False), ("jamba", True)],
                         ids=["mamba", "falcon_mamba_loop", "jamba"])
def test_prefill_is_rolled_and_matches_eager(family, associative):
    model = hugging_face(family, associative)
    layers = mamba_layers(model)
    ids = torch.randint(0, 64, (2, 37))
    compiled = compiler.compile(model, strict=True)
    with torch.no_grad():
        ours, baseline = compiled(ids, use_cache=True), model(ids, use_cache=True)
        reference = copy.deepcopy(model).double()(ids, use_cache=True)
    report = compiled.report()
    assert report.count("rolled mamba_selective_scan, L=37") == len(layers) == LAYERS - (family == "jamba"), report
    assert compiled.patterns.count("ssm_scan") == len(layers), report
    assert_close_by_rule(ours.logits, baseline.logits, reference.logits)
    assert_caches_close(layers, ours.cache, baseline.cache, reference.cache)


def test_decode_after_rolled_prefill_matches_eager():
    """Prefill (rolled scan) and two decode steps (fused state updates), each writing the cache as eager does."""
    model = hugging_face("mamba")
    reference_model = copy.deepcopy(model).double()

    def generate(forward):
        torch.manual_seed(1)
        with torch.no_grad():
            out = forward(torch.randint(0, 64, (2, 11)), use_cache=True)
            logits = [out.logits]
            for step in range(2):
                out = forward(torch.randint(0, 64, (2, 1)), cache=out.cache, use_cache=True)
                logits.append(out.logits)
        return logits, out.cache

    compiled = compiler.compile(model, strict=True)
    (ours, ours_cache), (baseline, baseline_cache), (reference, reference_cache) = (
        generate(forward) for forward in (compiled, model, reference_model))
    report = compiled.report()
    assert "rolled mamba_selective_scan, L=11" in report and "decode step" in report, report
    for step in zip(ours, baseline, reference, strict=True):
        assert_close_by_rule(*step)
    assert_caches_close(mamba_layers(model), ours_cache, baseline_cache, reference_cache)


def test_a_new_length_under_automatic_dynamic_shapes():
    """The second length makes Dynamo's sizes symbolic; the rolled op's fake output keeps a SymInt that the
    fused op must not allocate with."""
    model = hugging_face("mamba", layers=1)
    reference_model = copy.deepcopy(model).double()
    compiled = compiler.compile(model, strict=True, dynamic=None)
    with torch.no_grad():
        for length in (9, 13):
            ids = torch.randint(0, 64, (1, length))
            ours, baseline, reference = compiled(ids), model(ids), reference_model(ids)
            assert_close_by_rule(ours.logits, baseline.logits, reference.logits)
    assert "rolled mamba_selective_scan, L=13" in compiled.report(), compiled.report()


def test_training_through_a_rolled_scan_matches_eager():
    model = hugging_face("mamba").train()
    models = {"ours": model, "baseline": copy.deepcopy(model), "reference": copy.deepcopy(model).double()}
    compiled = compiler.compile(models["ours"], strict=True)
    ids = torch.randint(0, 64, (2, 13))
    losses = {name: (compiled if name == "ours" else m)(ids, labels=ids).loss for name, m in models.items()}
    for loss in losses.values():
        loss.backward()
    assert "rolled mamba_selective_scan, L=13" in compiled.report(), compiled.report()
    assert_close_by_rule(*losses.values())
    for name, parameter in models["ours"].named_parameters():
        grads = [dict(m.named_parameters())[name].grad for m in models.values()]
        assert_close_by_rule(*grads)


def rolled_call_inputs(dtype: torch.dtype = torch.float32, requires_grad: bool = True) -> list:
    """Arguments of flashfx::rolled_selective_scan for transformers' scan: key, u, delta, A, B, C, D, z,
    delta_bias, delta_softplus."""
    torch.manual_seed(0)
    b, d, n, seqlen = 2, 5, 3, 7
    tensors = [torch.randn(b, d, seqlen), torch.randn(b, d, seqlen), -torch.rand(d, n) - 0.5, torch.randn(b, n, seqlen),
               torch.randn(b, n, seqlen), torch.randn(d), torch.randn(b, d, seqlen), torch.randn(d)]
    tensors = [t.to(dtype).requires_grad_(requires_grad) for t in tensors]
    return [key_of(known_scans._plain_function(mamba_selective_scan)), *tensors, True]


def test_rolled_op_passes_opcheck():
    torch.library.opcheck(torch.ops.flashfx.rolled_selective_scan.default, rolled_call_inputs())


def test_rolled_op_gradients_match_the_function():
    """Unfused (another backend, symbolic sizes), the op's backward recomputes the function under autograd."""
    results = {}
    for name, dtype, run in [("ours", torch.float32, torch.ops.flashfx.rolled_selective_scan),
                             ("baseline", torch.float32, None), ("reference", torch.float64, None)]:
        key, *tensors, softplus = rolled_call_inputs(dtype)
        out, state = (run(key, *tensors, softplus) if run is not None else
                      mamba_selective_scan(*tensors[:5], D=tensors[5], z=tensors[6], delta_bias=tensors[7],
                                           delta_softplus=softplus, return_last_state=True))
        (out.sum() + (state * state).sum()).backward()
        results[name] = [out, state] + [t.grad for t in tensors]
    for values in zip(*results.values(), strict=True):
        assert_close_by_rule(*values)


# -- opting out, other backends -----------------------------------------------------------------
class HuggingFaceScan(nn.Module):
    def forward(self, u, delta, A, B, C, D):
        return mamba_selective_scan(u, delta, A, B, C, D=D, delta_softplus=True)


def scan_inputs(seqlen: int = 9, dim: int = 5, dstate: int = 3):
    torch.manual_seed(0)
    return (torch.randn(1, dim, seqlen), torch.randn(1, dim, seqlen), -torch.rand(dim, dstate) - 0.5,
            torch.randn(1, dstate, seqlen), torch.randn(1, dstate, seqlen), torch.randn(dim))


def fused_details(report) -> list[str]:
    return [entry.detail for entry in report.fused]


def run_flashfx_backend(options: dict) -> list[str]:
    """The fused ops' details of one torch.compile(backend="flashfx") call (its report is the default backend's)."""
    before = len(default_backend.report.fused)
    torch._dynamo.reset()
    torch.compile(HuggingFaceScan(), backend="flashfx", options=options)(*scan_inputs())
    return fused_details(default_backend.report)[before:]


@pytest.mark.parametrize("how", ["compile_option", "environment", "backend_option"])
def test_opting_out_traces_the_loop_as_written(how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("FLASHFX_ROLLED", "0")
    if how == "backend_option":
        details = run_flashfx_backend({"rolled": False})
        assert run_flashfx_backend({})[0].startswith("rolled mamba_selective_scan")
    else:
        compiled = compiler.compile(HuggingFaceScan(), strict=True, rolled=how != "compile_option")
        compiled(*scan_inputs())
        details = fused_details(compiled._report)
    assert len(details) == 1 and details[0].startswith("unrolled loop, L=9"), details


def test_other_backends_trace_the_loop_as_written():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    args = scan_inputs()
    torch._dynamo.reset()
    ours = torch.compile(HuggingFaceScan(), backend=record)(*args)
    (graph,) = graphs
    targets = [node.target for node in graph.graph.nodes]
    assert torch.ops.flashfx.rolled_selective_scan.default not in targets
    assert targets.count(torch.matmul) == 9  # one readout per step
    torch.testing.assert_close(ours, HuggingFaceScan()(*args))


def test_long_unrolled_loop_is_pointed_out(monkeypatch):
    monkeypatch.setattr(recurrence, "LONG_LOOP", 8)
    compiled = compiler.compile(HuggingFaceScan(), strict=True, rolled=False)
    compiled(*scan_inputs())
    assert "unrolled the 9-step scan loop in mamba_selective_scan (modeling_mamba.py:" in compiled.report()
    assert "compiler.register_rolled(mamba_selective_scan)" in compiled.report()


# -- mamba_ssm, registered when imported --------------------------------------------------------
STAND_IN = '''
"""Stands in for mamba_ssm's module: selective_scan_ref's signature, with packed sequences (cu_seqlens)."""
import torch
from models.mamba import selective_scan_ref as reference


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, cu_seqlens=None):
    if cu_seqlens is None:
        return reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    segments = zip(cu_seqlens[:-1], cu_seqlens[1:])
    return torch.cat([reference(u[..., s:e], delta[..., s:e], A, B[..., s:e], C[..., s:e], D,
                                delta_softplus=delta_softplus) for s, e in segments], dim=-1)
'''


@pytest.fixture
def mamba_ssm_stand_in(tmp_path, monkeypatch):
    """A package named like mamba_ssm's selective_scan_interface, importable for this test only."""
    package = tmp_path / "mamba_ssm" / "ops"
    package.mkdir(parents=True)
    for init in (tmp_path / "mamba_ssm" / "__init__.py", package / "__init__.py"):
        init.write_text("")
    (package / "selective_scan_interface.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"]
    yield
    for name in names:
        sys.modules.pop(name, None)
    known_scans._registered.discard(names[-1])


class MambaSsmScan(nn.Module):
    def __init__(self, scan, cu_seqlens):
        super().__init__()
        self.scan, self.cu_seqlens = scan, cu_seqlens

    def forward(self, u, delta, A, B, C, D):
        return self.scan(u, delta, A, B, C, D, delta_softplus=True, cu_seqlens=self.cu_seqlens)


@pytest.mark.parametrize("packed", [False, True], ids=["one_sequence", "cu_seqlens"])
def test_mamba_ssm_reference_is_rolled_once_imported(mamba_ssm_stand_in, packed):
    assert "mamba_ssm.ops.selective_scan_interface" not in sys.modules
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # registered as it is imported

    module, args = MambaSsmScan(selective_scan_ref, (0, 5, 12) if packed else None), scan_inputs(seqlen=12)
    compiled = compiler.compile(module, strict=True)
    ours, baseline, reference = compiled(*args), module(*args), module(*[a.double() for a in args])
    details = fused_details(compiled._report)
    expected = ["unrolled loop, L=5", "unrolled loop, L=7"] if packed else ["rolled selective_scan_ref, L=12"]
    assert [detail.split(", b=")[0] for detail in details] == expected, details
    assert_close_by_rule(ours, baseline, reference)

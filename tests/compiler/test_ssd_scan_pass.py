"""The ssd_scan pass fuses Mamba-2's SSD, chunked and one-step, and the result matches fp64 eager.

Spellings: Hugging Face's Mamba2 (mamba2_chunk_scan with segment_sum, padded to whole chunks or
not, and mamba2_selective_state_update's in-place decode step), mamba_ssm's ssd_minimal_discrete
in torch and with einops (models.mamba2), and mamba_ssm's Mamba2.step (models.mamba2.ssd_step,
state.copy_ on a buffer). Every fusing test asserts the op fired and the outputs (and states)
obey the tolerance rule against the same model in fp64. Near-misses name the node that broke.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compiler
from models import mamba2
from tests.compiler.equivalence import assert_compiles_equivalent
from tests.numerics import assert_close_by_rule

transformers = pytest.importorskip("transformers")

SPELLINGS = [name for name in ("chunked", "einops") if name != "einops" or mamba2.einops is not None]


def hf_mamba2(layers: int = 2, groups: int = 2):
    config = transformers.Mamba2Config(num_hidden_layers=layers, hidden_size=32, num_heads=4, head_dim=8,
                                       state_size=8, expand=1, n_groups=groups, chunk_size=8, vocab_size=64)
    torch.manual_seed(0)
    return transformers.Mamba2ForCausalLM(config).eval()


def logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


@pytest.mark.parametrize("seqlen", [5, 16, 19])
def test_hf_mamba2_prefill(seqlen):
    """One chunk padded, two whole chunks (no padding), three with an awkward last one and a padding
    mask (Mamba2 zeroes the padded tokens' inputs)."""
    model = hf_mamba2()
    ids = torch.randint(0, 64, (2, seqlen), generator=torch.Generator().manual_seed(seqlen))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0 if seqlen == 19 else 1
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    with torch.no_grad():
        ours = logits(compiled, ids, attention_mask=mask)
        baseline = logits(model, ids, attention_mask=mask)
        reference = logits(copy.deepcopy(model).double(), ids, attention_mask=mask)
    assert compiled.patterns.count("ssd_scan") == 2, compiled.report()
    assert "D, z" in compiled.report() and "dt limits" in compiled.report()
    assert_close_by_rule(ours, baseline, reference)


def _states(output) -> list[torch.Tensor]:
    return [layer.recurrent_states[0] for layer in output.cache.layers]


def test_hf_mamba2_decode_updates_the_cache():
    """Prefill, then two one-token steps from the cache: logits and the cached states agree."""
    model = hf_mamba2()
    ids, steps = torch.randint(0, 64, (2, 11)), torch.randint(0, 64, (2, 2))
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    results = []
    with torch.no_grad():
        for run in (compiled, model, copy.deepcopy(model).double()):
            out = run(ids, use_cache=True)
            step_logits = [run(steps[:, t:t + 1], cache=out.cache, use_cache=True).logits for t in range(2)]
            results.append((torch.cat(step_logits, 1), _states(out)))
    assert [fused.detail.split(",")[0] for fused in compiled._report.fused if fused.pattern == "ssd_scan"] == \
        ["chunked", "chunked", "decode step", "decode step"], compiled.report()
    (ours, our_states), (baseline, base_states), (reference, ref_states) = results
    assert_close_by_rule(ours, baseline, reference)
    for state, base, ref in zip(our_states, base_states, ref_states):
        assert_close_by_rule(state, base, ref)


def test_hf_mamba2_prefill_continues_from_the_cache():
    """A second prompt chunk after the first: the chunked scan starts from the cached state (cat)."""
    model = hf_mamba2()
    ids, more = torch.randint(0, 64, (2, 11)), torch.randint(0, 64, (2, 5))
    compiled = compiler.compile(copy.deepcopy(model), strict=True)
    results = []
    with torch.no_grad():
        for run in (compiled, model, copy.deepcopy(model).double()):
            results.append(run(more, cache=run(ids, use_cache=True).cache, use_cache=True).logits)
    details = [fused.detail for fused in compiled._report.fused if fused.pattern == "ssd_scan"]
    assert len(details) == 4 and all("initial_state" in detail for detail in details[2:]), compiled.report()
    assert_close_by_rule(*results)


@pytest.mark.parametrize("scan", SPELLINGS)
def test_mamba_ssm_minimal_discrete(scan):
    config = mamba2.Mamba2Config.tiny()
    torch.manual_seed(0)
    mixer = mamba2.Mamba2Mixer(config, scan)
    u = torch.randn(2, 24, config.d_model)
    compiled = assert_compiles_equivalent(mixer, (u,), torch.float32, "ssd_scan")
    assert "3 chunks of 8" in compiled.report()


def test_bfloat16_mixer():
    config = mamba2.Mamba2Config(d_model=32, d_state=16, headdim=16, ngroups=1, chunk_size=16)
    torch.manual_seed(0)
    assert_compiles_equivalent(mamba2.Mamba2Mixer(config), (torch.randn(1, 32, 32),), torch.bfloat16, "ssd_scan")


class Loop(nn.Module):
    """The recurrence as a plain loop over time (Δ made for the whole sequence first, B and C per group
    repeated to heads, dt indexed twice per step), outputs stacked, then the D skip; the final state returned."""

    def forward(self, x, dt, A, B, C, D, dt_bias):
        dt = F.softplus(dt + dt_bias)
        batch, seqlen, heads, headdim = x.shape
        state = x.new_zeros(batch, heads, headdim, B.shape[-1])
        B, C = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
        ys = []
        for t in range(seqlen):
            decay = torch.exp(dt[:, t, :, None, None] * A[:, None, None])
            state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
        return torch.stack(ys, dim=1) + x * D[:, None], state


def test_plain_loop_over_time_runs_as_the_chunked_scan():
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 2, 13, 4, 5, 6
    args = (torch.randn(b, L, h, p, generator=g), torch.randn(b, L, h, generator=g), -torch.rand(h, generator=g),
            torch.randn(b, L, 2, n, generator=g), torch.randn(b, L, 2, n, generator=g), torch.randn(h, generator=g),
            torch.rand(h, generator=g) - 3)
    compiled = compiler.compile(Loop(), strict=True)
    with torch.no_grad():
        ours, baseline, reference = compiled(*args), Loop()(*args), Loop()(*(t.double() for t in args))
    assert compiled.patterns == ["ssd_scan"] and "loop over time, L=13" in compiled.report(), compiled.report()
    for out, base, ref in zip(ours, baseline, reference):
        assert_close_by_rule(out, base, ref)


def test_mamba_ssm_step_writes_its_state_in_place():
    module, args = mamba2.step_tiny()
    ours_module, reference_module = copy.deepcopy(module), copy.deepcopy(module).double()
    compiled = compiler.compile(ours_module, strict=True)
    with torch.no_grad():
        ours = compiled(*args)
        baseline = module(*args)
        reference = reference_module(*(a.double() for a in args))
    assert compiled.patterns == ["ssd_scan"], compiled.report()
    assert_close_by_rule(ours, baseline, reference)
    assert_close_by_rule(ours_module.state, module.state, reference_module.state)


class MinimalSSD(nn.Module):
    """mamba_ssm's ssd_minimal_discrete on x * Δ, A * Δ (chunks of 4), returning the final state or not."""

    def __init__(self, final_state: bool = True):
        super().__init__()
        self.final_state = final_state

    def forward(self, x, dt, A, B, C):
        y, state = mamba2.ssd_minimal_discrete(x * dt[..., None], A * dt, B, C, 4)
        return (y, state) if self.final_state else y


def minimal_ssd_case(final_state: bool = True):
    """(module, inputs) for opcheck and gradient tests: 2 chunks, 2 heads, per-head B and C."""
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 1, 8, 2, 4, 4
    inputs = [torch.randn(b, L, h, p, generator=g), F.softplus(torch.randn(b, L, h, generator=g)),
              -torch.rand(h, generator=g), torch.randn(b, L, h, n, generator=g), torch.randn(b, L, h, n, generator=g)]
    return MinimalSSD(final_state), inputs


def step_case():
    return mamba2.step_tiny()


def ssd_variant(X, A, B, C, block_len: int, variant: str):
    """ssd_minimal_discrete with one part changed so that it no longer computes the SSD."""
    X, A, B, C = [x.reshape(x.shape[0], x.shape[1] // block_len, block_len, *x.shape[2:]) for x in (X, A, B, C)]
    A = A.permute(0, 3, 1, 2)
    A_cumsum = torch.cumsum(A if variant != "other_cumsum" else A.abs(), dim=-1)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, torch.exp(mamba2.segsum(A)), X)
    if variant == "no_off_diagonal":
        return Y_diag.reshape(Y_diag.shape[0], -1, *Y_diag.shape[3:])
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", torch.exp(mamba2.segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0)))),
                              states)
    state_decay_out = torch.exp(A_cumsum if variant != "doubled_decay_out" else 2 * A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, new_states[:, :-1], state_decay_out)
    Y = Y_diag + Y_off
    return Y.reshape(Y.shape[0], -1, *Y.shape[3:])


class Variant(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant

    def forward(self, X, A, B, C):
        return ssd_variant(X, A, B, C, 4, self.variant)


def discrete_inputs():
    """X, a, B, C given as they are (no Δ ⊗ x, Δ ⊗ A products to find): mamba_ssm's test of its minimal SSD."""
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 2, 12, 3, 4, 5
    return (torch.randn(b, L, h, p, generator=g), -torch.rand(b, L, h, generator=g), torch.randn(b, L, h, n, generator=g),
            torch.randn(b, L, h, n, generator=g))


def test_discrete_inputs_fuse_with_unit_steps():
    class Minimal(nn.Module):
        def forward(self, X, A, B, C):
            return mamba2.ssd_minimal_discrete(X, A, B, C, 4)

    args = discrete_inputs()
    compiled = compiler.compile(Minimal(), strict=True)
    with torch.no_grad():
        ours, baseline, reference = compiled(*args), Minimal()(*args), Minimal()(*(t.double() for t in args))
    assert compiled.patterns == ["ssd_scan"], compiled.report()
    for out, base, ref in zip(ours, baseline, reference):
        assert_close_by_rule(out, base, ref)


@pytest.mark.parametrize("variant, node, reason", [
    ("no_off_diagonal", "Y_diag", "not added to the off-diagonal term"),
    ("doubled_decay_out", "Y_off", "has no factor exp(cs)"),
    ("other_cumsum", "A", "no cumsum along the step dim reads the chunked decay"),
])
def test_near_misses_name_the_node(variant, node, reason):
    args = discrete_inputs()
    compiled = compiler.compile(Variant(variant))
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), Variant(variant)(*args))
    assert compiled.patterns.count("ssd_scan") == 0
    misses = [miss for miss in compiled._report.near_misses if miss.pattern == "ssd_scan"]
    assert misses and misses[0].node.startswith(node) and reason in misses[0].reason, compiled.report()


class DecayAttention(nn.Module):
    """A decay mask exp(segsum(pad(a, (1, 0)))) over values, without the chunked SSD around it (a
    retention with a per-step decay): the pass starts no candidate there (that spelling is the SSD's
    decay between chunk boundaries), yet report() names the mask (compiler/passes/unmatched.py)."""

    def forward(self, a, v):
        return torch.exp(mamba2.segsum(F.pad(a, (1, 0)))) @ v


def test_an_unfused_decay_mask_is_reported():
    a, v = -torch.rand(2, 9), torch.randn(2, 10, 4)
    compiled = compiler.compile(DecayAttention())
    torch.testing.assert_close(compiled(a, v), DecayAttention()(a, v))
    assert compiled.patterns == [] and "ssd_scan at " in compiled.report(), compiled.report()


@pytest.mark.gpu
def test_hf_chunk_scan_at_mamba2_780m_size():
    """Hugging Face's mamba2_chunk_scan at Mamba2-780M's layer size in bf16, L 2048 + 16, through compile()."""
    from codegen.ssd_scan import ssd_scan_reference
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    class ChunkScan(nn.Module):
        def forward(self, x, dt, A, B, C, D, dt_bias):
            return mamba2_chunk_scan(x, dt, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True,
                                     dt_limit=(0.0, float("inf")))

    torch.manual_seed(0)
    b, L, h, p, n = 2, 2048 + 16, 48, 64, 128
    x, B, C = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for shape in
               ((b, L, h, p), (b, L, 1, n), (b, L, 1, n)))
    dt = 0.5 * torch.randn(b, L, h, device="cuda", dtype=torch.bfloat16)
    A, D = -torch.exp(torch.rand(h, device="cuda") * 2.7), torch.randn(h, device="cuda")
    dt_bias = torch.log(torch.expm1(torch.empty(h, device="cuda").uniform_(1e-3, 0.1)))
    compiled = compiler.compile(ChunkScan())
    with torch.no_grad():
        ours, baseline = compiled(x, dt, A, B, C, D, dt_bias), ChunkScan()(x, dt, A, B, C, D, dt_bias)
    reference, _ = ssd_scan_reference(*(t.double() for t in (x, dt, A[None, None].expand(b, L, h), B, C)),
                                      D=D.double()[:, None].expand(h, p), dt_bias=dt_bias.double(), dt_softplus=True,
                                      dt_limit=(0.0, float("inf")))
    assert compiled.patterns == ["ssd_scan"], compiled.report()
    assert_close_by_rule(ours, baseline, reference)


def test_training_recomputes_the_reference():
    """Gradients flow (the backward recomputes the PyTorch reference; no SSD backward kernel yet)."""
    config = mamba2.Mamba2Config.tiny()
    torch.manual_seed(0)
    mixer = mamba2.Mamba2Mixer(config)
    u = torch.randn(1, 16, config.d_model, requires_grad=True)
    compiled = compiler.compile(copy.deepcopy(mixer))
    compiled(u).square().sum().backward()
    reference_u = u.detach().double().requires_grad_()
    copy.deepcopy(mixer).double()(reference_u).square().sum().backward()
    torch.testing.assert_close(u.grad.double(), reference_u.grad, rtol=1e-4, atol=1e-5)
    assert compiled.patterns.count("ssd_scan") == 1

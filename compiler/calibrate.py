"""Calibration: make the MLPs of a dense model contextually sparse, DejaVu-style (`sparsify`).

    sites = the model's MLPs: our SparseMLP modules (models.dejavu), every pair of nn.Linear
            fc1 (d -> F), fc2 (F -> d) under one parent whose fc2 input is observed, on the first
            calibration batch, to be relu / gelu / gelu_tanh / silu of fc1's output (our GPT's MLP,
            Hugging Face OPT's fc1/fc2 decoder layers, nn.Sequential MLPs), and every gated MLP:
            a module with linears gate, up (d -> F) and down (F -> d) whose down input is observed
            to be act(gate(x)) * up_act(up(x)) (Hugging Face's LlamaMLP, ReLU-fied or not; Meta's
            FeedForward w1, w3, w2; TurboSparse's dReLU) and whose output is down's
    record over the calibration batches (dense forward), per site: the predictor's input (the block
            input for DejaVu blocks, DejaVu's lookahead; the MLP input elsewhere) and the MLP input
    per site:
        z = fc1(mlp input) (gated: the gate's), h = act(z) (gated: act(z) * up_act(up(mlp input)));
        target = the k = density * F neurons of largest |h|, per row
        predictor (rank r) = reduced-rank regression of z on the predictor input (closed form),
                             then `steps` Adam steps of BCE on top-k membership, kept if it
                             recalls more of a validation slice
        report, on held-out rows with one selection per row (batch-1 decode): recall of the true
        top-k, and |y_sparse - y_dense| / |y_dense| of the MLP output
    install SparseMLP(fc1, fc2, predictor, k, form[, up]) in place of each MLP (plain PyTorch, in the
            gathered or masked form that the compiler's sparse-MLP pass matches), then check that
            at k = F the model still computes its dense outputs; undo everything if not

The installed forward selects one set of k neurons per call, shared by all its rows (DejaVu's
per-batch selection): exact for decode batches, coarse for long prompts.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.dejavu import ACTIVATIONS, FORMS, UP_ACTIVATIONS, MLPPredictor, SparseMLP, hidden_activations

HELD_OUT_FRACTION = 0.2
BATCH_ROWS = 256  # rows per predictor fine-tuning step
LEARNING_RATE = 1e-3


@dataclass
class LayerReport:
    name: str
    d_model: int
    ffn: int
    k: int
    rank: int
    activation: str  # gated: "act*up", or "act*up_act" (dReLU: "relu*relu")
    recall: float  # mean fraction of the true top-k neurons that the predictor's top-k finds
    output_error: float  # |y_sparse - y_dense| / |y_dense| of the MLP output (Frobenius norms)

    @property
    def chance_recall(self) -> float:
        return self.k / self.ffn


@dataclass
class SparsifyReport:
    density: float
    form: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, why it was left dense)

    def __str__(self) -> str:
        lines = [f"sparsify: density {self.density:g}, form {self.form}, {len(self.layers)} MLPs"]
        lines.append(f"  {'layer':<40} {'d':>6} {'ffn':>7} {'k':>6} {'rank':>5} {'act':>12} "
                     f"{'recall':>7} {'chance':>7} {'out err':>8}")
        for r in self.layers:
            lines.append(f"  {r.name:<40} {r.d_model:>6} {r.ffn:>7} {r.k:>6} {r.rank:>5} {r.activation:>12} "
                         f"{r.recall:>7.3f} {r.chance_recall:>7.3f} {r.output_error:>8.4f}")
        lines += [f"  left dense: {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


Install = Callable[[MLPPredictor, int, str], tuple[SparseMLP, Callable[[], None]]]


@dataclass
class _Site:
    """One MLP: its linears and activation, how to install it, and its calibration rows.
    Gated MLPs have an `up` projection; fc1 is their gate, fc2 their down projection."""

    name: str
    fc1: nn.Linear
    fc2: nn.Linear
    activation: str
    install: Install  # (predictor, k, form) -> (the SparseMLP now in the model, undo)
    native: SparseMLP | None = None
    up: nn.Linear | None = None
    up_activation: str = "identity"
    mlp_inputs: list[torch.Tensor] = field(default_factory=list)
    predictor_inputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def described_activation(self) -> str:
        if self.up is None:
            return self.activation
        return f"{self.activation}*{'up' if self.up_activation == 'identity' else self.up_activation}"

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h, the input of fc2, in fp32."""
        up = None if self.up is None else (self.up.weight.detach().float(), _maybe_float(self.up.bias),
                                           UP_ACTIVATIONS[self.up_activation])
        return hidden_activations(x, self.fc1.weight.detach().float(), _maybe_float(self.fc1.bias),
                                  ACTIVATIONS[self.activation], up)


def sparsify(model: nn.Module, calibration_batches, density: float = 0.1, rank: int | None = None,
             steps: int = 200, progress: bool = True, *, form: str = "gathered") -> SparsifyReport:
    """Train a DejaVu predictor for every MLP of `model` and install the sparse forward in place.

    calibration_batches: an iterable of model inputs (a tensor, a tuple of positional args, or a
    dict of keyword args), e.g. a few batches of token ids. density: fraction of each MLP's
    neurons kept. rank: predictor rank (None: the existing predictor's rank for our SparseMLP
    modules, max(16, d / 16) elsewhere). steps: BCE fine-tuning steps per predictor. form:
    "gathered" or "masked". Returns a SparsifyReport (print it for a table).
    """
    if form not in FORMS[1:]:
        raise ValueError(f"form must be 'gathered' or 'masked', got {form!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("sparsify needs at least one calibration batch")
    was_training = model.training
    model.eval()
    natives = [_native_site(name, m) for name, m in model.named_modules() if isinstance(m, SparseMLP)]
    try:
        with torch.no_grad(), _dense_forms(natives):
            foreign, skipped = _foreign_sites(model, batches[0])
            sites = natives + foreign
            dense_output = _record(model, sites, batches, progress)
        report = SparsifyReport(density, form, skipped=skipped)
        fitted = []
        for site in tqdm(sites, desc="sparsify: fitting predictors", disable=not progress):
            k = max(1, round(density * site.fc1.out_features))
            predictor, layer = _fit(site, k, rank, steps)
            report.layers.append(layer)
            fitted.append((site, predictor, k))
        _install_checked(model, fitted, form, batches[0], dense_output)
    finally:
        model.train(was_training)
    return report


# -- finding the MLPs ---------------------------------------------------------------------------

def _foreign_sites(model: nn.Module, batch) -> tuple[list[_Site], list[tuple[str, str]]]:
    """Linear pairs observed to compute fc2(act(fc1(x))) on `batch`, gated MLPs observed to compute
    down(act(gate(x)) * up_act(up(x))), and near-misses with reasons."""
    pairs, triples = _linear_pairs(model), _gated_triples(model)
    observed = _observe(model, batch, [(owner, names) for _, owner, *names in pairs + triples])
    candidates = [(_foreign_site, pair) for pair in pairs] + [(_gated_site, triple) for triple in triples]
    sites, skipped = [], []
    for find, (owner_name, owner, *names) in candidates:
        site_or_reason = find(model, owner_name, owner, *names, observed)
        if isinstance(site_or_reason, _Site):
            sites.append(site_or_reason)
        elif site_or_reason is not None:
            skipped.append((_join(owner_name, names[0]), site_or_reason))
    return sites, skipped


def _native_site(name: str, mlp: SparseMLP) -> _Site:
    """One of our SparseMLP modules: installing swaps in the trained predictor, k and form."""
    def install(predictor: MLPPredictor, k: int, form: str):
        previous = (mlp.predictor, mlp.k, mlp.form)
        mlp.predictor, mlp.k, mlp.form = predictor, k, form

        def undo():
            mlp.predictor, mlp.k, mlp.form = previous
        return mlp, undo
    return _Site(name, mlp.fc1, mlp.fc2, mlp.activation, install, native=mlp, up=mlp.up,
                 up_activation=mlp.up_activation)


@contextmanager
def _dense_forms(natives: list[_Site]):
    """Our SparseMLP modules run dense while the calibration rows are recorded."""
    forms = [site.native.form for site in natives]
    for site in natives:
        site.native.form = "dense"
    try:
        yield
    finally:
        for site, form in zip(natives, forms):
            site.native.form = form


def _linear_pairs(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """(owner name, owner, fc1 name, fc2 name) for child linears shaped d -> F and F -> d."""
    pairs = []
    for owner_name, owner in model.named_modules():
        if isinstance(owner, (SparseMLP, MLPPredictor)):
            continue
        linears = [(n, m) for n, m in owner.named_children() if isinstance(m, nn.Linear)]
        pairs += [(owner_name, owner, n1, n2) for n1, a in linears for n2, b in linears
                  if a is not b and a.out_features == b.in_features and a.in_features == b.out_features]
    return pairs


def _gated_triples(model: nn.Module) -> list[tuple[str, nn.Module, str, str, str]]:
    """(owner name, owner, one of gate/up, the other, down name) for child linears shaped d -> F
    (two of them, each pair once) and F -> d."""
    triples = []
    for owner_name, owner in model.named_modules():
        if isinstance(owner, (SparseMLP, MLPPredictor)):
            continue
        linears = [(n, m) for n, m in owner.named_children() if isinstance(m, nn.Linear)]
        triples += [(owner_name, owner, n1, n2, n3) for i, (n1, a) in enumerate(linears)
                    for n2, b in linears[i + 1:] for n3, c in linears
                    if (a.in_features, a.out_features) == (b.in_features, b.out_features)
                    == (c.out_features, c.in_features) and c is not a and c is not b]
    return triples


def _observe(model: nn.Module, batch, candidates) -> dict[int, tuple]:
    """First-call (inputs[0], output) of each candidate linear, owner, and parameter-free child of an
    owner; candidates are (owner, names of its linears)."""
    watched = {}
    for owner, names in candidates:
        watched[id(owner)] = owner
        watched.update((id(m), m) for m in (getattr(owner, name) for name in names))
        watched.update((id(m), m) for m in owner.children() if next(m.parameters(), None) is None)
    seen: dict[int, tuple] = {}

    def hook(module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            seen.setdefault(id(module), (args[0], output))
    handles = [m.register_forward_hook(hook) for m in watched.values()]
    try:
        _call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _foreign_site(model, owner_name, owner, fc1_name, fc2_name, observed) -> _Site | str | None:
    """A site for the pair, why it cannot be one (a near-miss), or None when it is no MLP at all."""
    fc1, fc2 = getattr(owner, fc1_name), getattr(owner, fc2_name)
    if id(fc1) not in observed or id(fc2) not in observed:
        return None
    fc1_in, fc1_out = observed[id(fc1)]
    fc2_in, _ = observed[id(fc2)]
    activation = _activation_between(fc1_out, fc2_in)
    if activation is None:
        return None
    name = _join(owner_name, fc1_name)
    owner_call = observed.get(id(owner))
    is_whole_mlp = (owner_name and owner_call is not None and _same(owner_call[0], fc1_in)
                    and _same(owner_call[1], observed[id(fc2)][1]))
    if is_whole_mlp:
        return _Site(owner_name, fc1, fc2, activation, _replacer(model, owner_name, fc1, fc2, activation))
    act_names = [n for n, m in owner.named_children() if id(m) in observed and observed[id(m)][0] is fc1_out]
    if not act_names:
        return f"its activation is applied functionally inside {type(owner).__name__}.forward, which does more than the MLP"
    return _Site(name, fc1, fc2, activation, _fold_into_fc1(owner, fc1_name, act_names[0], fc2_name, activation))


def _gated_site(model, owner_name, owner, first_name, second_name, down_name, observed) -> _Site | str | None:
    """A site for a gated MLP module, why it cannot be one, or None when the linears do not gate."""
    first, second, down = (getattr(owner, name) for name in (first_name, second_name, down_name))
    if not all(id(m) in observed for m in (first, second, down)):
        return None
    (first_in, first_out), (second_in, second_out), (down_in, down_out) = (observed[id(m)] for m in (first, second, down))
    gating = _gating_between(first_out, second_out, down_in) if _same(first_in, second_in) else None
    if gating is None:
        return None
    gate_first, activation, up_activation = gating
    gate, up = (first, second) if gate_first else (second, first)
    owner_call = observed.get(id(owner))
    if not (owner_name and owner_call is not None and _same(owner_call[0], first_in) and _same(owner_call[1], down_out)):
        return (f"a gated MLP inside {type(owner).__name__}.forward, which does more than the MLP (only "
                "whole gated MLP modules are replaced)")
    install = _replacer(model, owner_name, gate, down, activation, up=up, up_activation=up_activation)
    return _Site(owner_name, gate, down, activation, install, up=up, up_activation=up_activation)


def _gating_between(first_out, second_out, down_in) -> tuple[bool, str, str] | None:
    """(whether the first linear is the gate, act, up_act) that map the two outputs to down's input
    as act(gate) * up_act(up), within rounding, if any."""
    if not first_out.shape == second_out.shape == down_in.shape:
        return None
    tolerance = 8 * torch.finfo(down_in.dtype).eps * (1 + down_in.abs().max().item())
    errors = {(gate_first, act, up_act): (ACTIVATIONS[act](gate) * UP_ACTIVATIONS[up_act](up) - down_in).abs().max().item()
              for gate_first, (gate, up) in ((True, (first_out, second_out)), (False, (second_out, first_out)))
              for act in ACTIVATIONS for up_act in UP_ACTIVATIONS}
    best = min(errors, key=errors.get)
    return best if errors[best] <= tolerance else None


def _activation_between(fc1_out: torch.Tensor, fc2_in: torch.Tensor) -> str | None:
    """The activation that maps fc1's output to fc2's input, within rounding, if any."""
    if fc1_out.shape != fc2_in.shape:
        return None
    tolerance = 8 * torch.finfo(fc2_in.dtype).eps * (1 + fc2_in.abs().max().item())
    errors = {name: (act(fc1_out) - fc2_in).abs().max().item() for name, act in ACTIVATIONS.items()}
    best = min(errors, key=errors.get)
    return best if errors[best] <= tolerance else None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _join(owner_name: str, child: str) -> str:
    return f"{owner_name}.{child}" if owner_name else child


def _replacer(model: nn.Module, name: str, fc1: nn.Linear, fc2: nn.Linear, activation: str, **gating) -> Install:
    """Install by replacing the module `name`, whose forward is exactly the MLP (our GPT's MLP,
    Hugging Face's LlamaMLP); `gating`: SparseMLP's up and up_activation for a gated MLP."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)

    def install(predictor: MLPPredictor, k: int, form: str):
        old = getattr(parent, attr)
        new = SparseMLP(fc1, fc2, predictor, k=k, activation=activation, form=form, **gating)
        setattr(parent, attr, new)
        return new, lambda: setattr(parent, attr, old)
    return install


def _fold_into_fc1(owner: nn.Module, fc1_name: str, act_name: str, fc2_name: str, activation: str) -> Install:
    """Install inside a larger forward (HF OPT's decoder layer): fc1 becomes the whole sparse MLP,
    the activation module and fc2 become identities."""
    def install(predictor: MLPPredictor, k: int, form: str):
        old = {n: getattr(owner, n) for n in (fc1_name, act_name, fc2_name)}
        new = SparseMLP(old[fc1_name], old[fc2_name], predictor, k=k, activation=activation, form=form)
        setattr(owner, fc1_name, new)
        setattr(owner, act_name, nn.Identity())
        setattr(owner, fc2_name, nn.Identity())

        def undo():
            for n, module in old.items():
                setattr(owner, n, module)
        return new, undo
    return install


# -- recording ----------------------------------------------------------------------------------

def _record(model: nn.Module, sites: list[_Site], batches, progress: bool) -> torch.Tensor:
    """Run the dense model over the batches, keeping each site's rows; returns the first batch's output."""
    handles = [_recording_hook(site) for site in sites]
    try:
        outputs = [_first_tensor(_call(model, batch))
                   for batch in tqdm(batches, desc="sparsify: calibration batches", disable=not progress)]
    finally:
        for handle in handles:
            handle.remove()
    return outputs[0]


def _recording_hook(site: _Site):
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1, t.shape[-1]).float()

    if site.native is not None:
        def native_hook(module, args, kwargs):
            x = args[0]
            predictor_input = kwargs.get("predictor_input", args[1] if len(args) > 1 else None)
            site.mlp_inputs.append(rows(x))
            site.predictor_inputs.append(rows(x if predictor_input is None else predictor_input))
        return site.native.register_forward_pre_hook(native_hook, with_kwargs=True)

    def fc1_hook(module, args):
        site.mlp_inputs.append(rows(args[0]))
        site.predictor_inputs.append(site.mlp_inputs[-1])
    return site.fc1.register_forward_pre_hook(fc1_hook)


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first_tensor(output) -> torch.Tensor:
    """The main tensor of a model output: itself, .logits, or the first tensor in a tuple/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    values = output.values() if isinstance(output, dict) else output
    return next(v for v in values if isinstance(v, torch.Tensor))


# -- fitting ------------------------------------------------------------------------------------

def _fit(site: _Site, k: int, rank: int | None, steps: int) -> tuple[MLPPredictor, LayerReport]:
    """A trained predictor for the site and its report."""
    x, p = torch.cat(site.mlp_inputs), torch.cat(site.predictor_inputs)
    w1, b1 = site.fc1.weight.detach().float(), _maybe_float(site.fc1.bias)
    z, h = F.linear(x, w1, b1), site.hidden(x)
    target = _top_k_mask(h.abs(), k)
    train, held_out = _split(x.shape[0])
    d, ffn = w1.shape[1], w1.shape[0]
    rank = min(d, rank or (site.native.predictor.down.out_features if site.native else max(16, d // 16)))
    predictor = _reduced_rank_predictor(p[train], z[train], rank)
    predictor = _fine_tuned(predictor, p[train], target[train], k, steps)
    with torch.no_grad():
        chosen = _top_k_mask(predictor(p[held_out]), k)
    recall = _recall(chosen, target[held_out], k)
    error = _output_error(h[held_out], chosen, site.fc2)
    predictor = predictor.to(device=site.fc1.weight.device, dtype=site.fc1.weight.dtype)
    return predictor, LayerReport(site.name, d, ffn, k, rank, site.described_activation, recall, error)


def _maybe_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, F) bool: the k largest scores of each row."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)


def _recall(chosen: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Mean fraction of each row's true top-k that the chosen top-k contains."""
    return (chosen & target).sum(1).float().mean().item() / k


def _split(n: int) -> tuple[slice, slice]:
    """Training rows first, the last HELD_OUT_FRACTION held out (all rows serve both when few)."""
    held = int(n * HELD_OUT_FRACTION)
    if held < 1:
        return slice(0, n), slice(0, n)
    return slice(0, n - held), slice(n - held, n)


def _reduced_rank_predictor(p: torch.Tensor, z: torch.Tensor, rank: int) -> MLPPredictor:
    """The rank-r linear map from p to z that best fits in least squares (reduced-rank regression).

    coef = ridge least squares of centred z on centred p (d, F); V = top-r right singular vectors
    of the fitted values p coef (from R coef, p = QR); predictor: down = (coef V)^T, up = V with
    bias z_mean - p_mean coef V V^T.
    """
    p64, z64 = p.double(), z.double()
    p_mean, z_mean = p64.mean(0), z64.mean(0)
    pc, zc = p64 - p_mean, z64 - z_mean
    gram = pc.T @ pc
    ridge = 1e-4 * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + ridge, pc.T @ zc)
    r_factor = torch.linalg.qr(pc, mode="r").R
    v = torch.linalg.svd(r_factor @ coef, full_matrices=False).Vh[:rank].T
    predictor = MLPPredictor(p.shape[1], z.shape[1], rank).to(p.device)
    with torch.no_grad():
        predictor.down.weight.copy_((coef @ v).T)
        predictor.up.weight.copy_(v)
        predictor.up.bias.copy_(z_mean - (p_mean @ coef @ v) @ v.T)
    return predictor


def _fine_tuned(start: MLPPredictor, p: torch.Tensor, target: torch.Tensor, k: int, steps: int) -> MLPPredictor:
    """`steps` Adam steps of BCE on top-k membership (DejaVu's objective) from the regression's
    predictor, kept only if it recalls more of a validation slice of the rows than `start`."""
    fit, validation = _split(p.shape[0])
    predictor = copy.deepcopy(start)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(fit.start, fit.stop, (min(BATCH_ROWS, fit.stop - fit.start),), generator=generator)
        with torch.enable_grad():
            loss = F.binary_cross_entropy_with_logits(predictor(p[rows]), target[rows].float())
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    with torch.no_grad():
        recalls = [_recall(_top_k_mask(q(p[validation]), k), target[validation], k) for q in (start, predictor)]
    return predictor if recalls[1] > recalls[0] else start


def _output_error(h: torch.Tensor, chosen: torch.Tensor, fc2: nn.Linear) -> float:
    w2, b2 = fc2.weight.detach().float(), _maybe_float(fc2.bias)
    dense = F.linear(h, w2, b2)
    sparse = F.linear(h * chosen, w2, b2)
    return ((sparse - dense).norm() / dense.norm().clamp_min(1e-12)).item()


# -- installing ---------------------------------------------------------------------------------

def _install_checked(model, fitted, form: str, batch, dense_output) -> None:
    """Install every predictor; at k = F the model must reproduce its dense output, else undo all."""
    installed = [site.install(predictor, site.fc1.out_features, form) for site, predictor, _ in fitted]
    with torch.no_grad():
        output = _first_tensor(_call(model, batch))
    for (module, _), (_, _, k) in zip(installed, fitted):
        module.k = k
    scale = dense_output.abs().max().item()
    if not torch.allclose(output, dense_output, rtol=1e-3, atol=1e-3 * scale):
        for _, undo in reversed(installed):
            undo()
        raise RuntimeError("flashfx sparsify: the installed sparse MLPs do not reproduce the dense model at "
                           "full density; the model was left unchanged")

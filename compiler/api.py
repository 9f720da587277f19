"""Public API: `compile(model)` and `warmup(model, inputs)`.

    cm = compiler.compile(model)   # an nn.Module; same outputs as model(...)
    y = cm(x)                      # first call per shape captures, matches, generates, loads
    cm.kernels                     # [Kernel(name, pattern, source, path, config, replaced)]
    print(cm.report())             # matched ops, near-misses and run-time fallbacks

Capture goes through TorchDynamo (`torch.compile` with our backend), so Python control flow
and Hugging Face models work, graph breaks run eagerly between the captured graphs, and a
new input shape recompiles under Dynamo's guards. By default (`dynamic=False`) every graph
is specialised to its shapes, so constant masks are classified (e.g. as causal) and every
pass sees static lengths. `dynamic=None` (Dynamo's automatic dynamic shapes) gives a size
that keeps changing one symbolic graph instead of a recompile per size, for a decode loop
over a growing KV cache: attention stays fused (with its mask as a tensor), while passes
that need static lengths (long convolutions) leave symbolic graphs to PyTorch and say so.
A preallocated (static) KV cache avoids both.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from tqdm.auto import tqdm

from compiler.backend import Backend, check_mode
from compiler.report import Report
from runtime import knobs
from runtime.dispatch import Kernel


DYNAMO_LOG = logging.getLogger("torch._dynamo.convert_frame")
RECOMPILE_LIMIT_NOTE = ("TorchDynamo hit its recompile limit (config.{limit}): later calls of {function} run "
                        "eagerly, unfused. Raise torch._dynamo.config.{limit}, or compile with dynamic=None so a "
                        "changing size becomes symbolic.")
FULL_CACHE_NOTE = ("TorchDynamo's recompile limit is used up for {function} (config.recompile_limit = {limit} "
                   "entries in its cache): calls that need a new graph run eagerly, unfused. The cache belongs to the "
                   "function's code object, which every instance of the class shares, and each compiled instance "
                   "adds entries to it as each new shape does, so other models may have filled it. Compile one "
                   "instance and reuse it, call torch._dynamo.reset() before compiling another, or raise "
                   "torch._dynamo.config.recompile_limit.")
DISABLED_NOTE = "flashfx is disabled (FLASHFX_DISABLE=1): the model runs eagerly; nothing is captured or fused."


class _RecompileLimitNotes(logging.Handler):
    """Turns TorchDynamo's "hit config.recompile_limit" warning, logged while this module runs, into a
    report() note: past the limit Dynamo runs the frame eagerly and flashfx never sees it."""

    def __init__(self, report: Report):
        super().__init__(logging.WARNING)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("torch._dynamo hit config."):
            return
        args = tuple(record.args or ()) + ("recompile_limit", None, "a function")
        note = RECOMPILE_LIMIT_NOTE.format(limit=args[0], function=str(args[2]).split(" (")[0])
        if note not in self.report.notes:
            self.report.notes.append(note)


def _dynamo_cache_full(function) -> bool:
    """Has TorchDynamo's cache for `function`'s code object (shared by every instance of its class)
    reached config.recompile_limit? Past it, Dynamo runs the function eagerly for new guards."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # Dynamo is imported by now (torch.compile)

    code = getattr(function, "__code__", None)
    return code is not None and len(_debug_get_cache_entry_list(code)) >= torch._dynamo.config.recompile_limit


class CompiledModule(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, *, mode: str = "default", dynamic: bool | None = False,
                 fullgraph: bool = False, strict: bool = False, inductor: bool | None = None, rolled: bool = True):
        super().__init__()
        check_mode(mode, inductor)
        self.model = model
        self._report = Report()
        self._backend = Backend(self._report, strict=strict, mode=mode, inductor=inductor, rolled=rolled)
        self._compiled = model if knobs.disabled() else torch.compile(
            model, backend=self._backend, dynamic=dynamic, fullgraph=fullgraph)
        self._limit_notes = _RecompileLimitNotes(self._report)
        self._watch_cache = self._compiled is not model  # until the full-cache note is given
        if not self._watch_cache:
            self._report.notes.append(DISABLED_NOTE)

    def forward(self, *args, **kwargs):
        DYNAMO_LOG.addHandler(self._limit_notes)
        try:
            return self._compiled(*args, **kwargs)
        finally:
            DYNAMO_LOG.removeHandler(self._limit_notes)
            self._note_full_cache()

    def _note_full_cache(self) -> None:
        """Note in report() once Dynamo's cache for the model's forward is full, whoever filled it:
        Dynamo logs the limit only to the call that reaches it."""
        forward = type(self.model).forward
        if self._watch_cache and _dynamo_cache_full(forward):
            self._watch_cache = False
            self._report.notes.append(FULL_CACHE_NOTE.format(
                function=f"{type(self.model).__qualname__}.forward", limit=torch._dynamo.config.recompile_limit))

    def __getattr__(self, name: str):
        """Attributes the model has and this wrapper does not (a Hugging Face model's config...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    def state_dict(self, *args, **kwargs):
        """The model's state dict, with the model's own keys (loadable into the uncompiled model)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def kernels(self) -> list[Kernel]:
        unique: dict[str, Kernel] = {}
        for op in self._report.ops:
            for kernel in op.kernels.values():
                unique.setdefault(kernel.path, kernel)
        return list(unique.values())

    def report(self) -> str:
        return self._report.render()

    @property
    def patterns(self) -> list[str]:
        """The pattern of every fused op, in the order they were fused."""
        return [entry.pattern for entry in self._report.fused]


def compile(model: torch.nn.Module, *, mode: str = "default", dynamic: bool | None = False,
            fullgraph: bool = False, strict: bool = False, inductor: bool | None = None,
            rolled: bool = True) -> CompiledModule:
    """Compile `model` with flashfx.

    mode: "default" launches each kernel with a tuned config from the cache if there is one,
          else its heuristic config, and never benchmarks; "max-autotune" benchmarks the
          template's candidates once per shape bucket and persists the winner; "reduce-overhead"
          tunes as "default" and runs each graph Inductor compiles under CUDA graphs (the fused
          ops then make no host synchronisation; see compiler.backend).
    dynamic: passed to TorchDynamo (False: specialise every shape; None: go symbolic for sizes
          that keep changing; see the module docstring).
    strict: raise instead of leaving a graph that flashfx failed to compile to PyTorch.
    inductor: compile what flashfx does not fuse with Inductor (True), run it eagerly (False), or
          (None) use Inductor for graphs on CUDA only (see compiler.backend).
    rolled: keep the scan loops of transformers' Mamba family and mamba_ssm's selective_scan_ref
          rolled at capture, so capture time does not grow with the sequence length (False: let
          TorchDynamo unroll them, as it does any Python loop; see compiler.known_scans).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compiler.compile expects an nn.Module, got {type(model).__name__}")
    return CompiledModule(model, mode=mode, dynamic=dynamic, fullgraph=fullgraph, strict=strict, inductor=inductor,
                          rolled=rolled)


def warmup(model: torch.nn.Module, inputs: Iterable, *, mode: str = "max-autotune",
           progress: bool = True) -> CompiledModule:
    """Compile `model` and run it once per input (a tensor, a tuple of args or a dict of kwargs).

    Each distinct shape is captured, matched, its kernels generated, loaded and (in
    "max-autotune" mode) tuned now and persisted, so later processes start warm.
    `inputs` is a list of those inputs: a bare tensor or dict is a TypeError (iterating over it
    would warm the model on its rows or keys), so warm one input set as [x].
    """
    if isinstance(inputs, (torch.Tensor, dict)):
        raise TypeError(f"compiler.warmup expects a list of inputs, one per shape, got a {type(inputs).__name__}; "
                        "for one input set pass [x] (a tensor), [(x, y)] (args) or [{'x': x}] (kwargs)")
    compiled = model if isinstance(model, CompiledModule) else compile(model, mode=mode)
    inputs = list(inputs)
    with torch.no_grad():
        for example in tqdm(inputs, desc="flashfx warmup", disable=not progress):
            if isinstance(example, dict):
                compiled(**example)
            elif isinstance(example, (tuple, list)):
                compiled(*example)
            else:
                compiled(example)
    return compiled

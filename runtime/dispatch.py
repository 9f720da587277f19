"""Fused ops at run time: launch the generated kernel, or fall back to PyTorch.

A FusedOp is what compiler.lower builds, from a pass's FusedSpec, in place of the nodes the pass
fused (prepare() loads its kernels then); the lowered fx graph calls it through its custom op,
torch.ops.flashfx.<library_op>(operands, key) (runtime.library). On each call it decides:

    reason = why_not_kernel(tensors)      # device, dtype, autograd, unsupported shape...
    if reason is None: out = launch(...)  # generated Triton kernel (loaded from the cache)
    else:              out = reference(...) and count `reason` for report()

so it never returns an answer the kernel could not compute correctly. What the call's metadata
decides (views, reasons from shapes and dtypes, spec, config, output shapes) each family keeps per
call signature (runtime.plans: `plan_key`, `run_planned`). An op whose plan decides everything
keeps a fast path per signature (`fast_path`): a FastCall (runtime.bound) that replays the call's
views, allocations and kernel launches as one generated function; the latest one taken is found
again by a signature check in C++ (runtime.plans.signature_check) before any key is built. An op
compiled for CUDA graphs (`sync_free`) makes no host synchronisation on its default path; one that
must still read values on the host says why (`host_sync_reason`) and is called through its custom
op's cudagraph_unsafe twin (`host_synced`), which Inductor runs outside the graphs. An op captured for
training (`differentiable`, decided at compile time from whether its output requires grad, which
TorchDynamo guards) is called through its custom op's _saving twin and also returns the residuals
its backward kernels need (`forward_saving`). A family without backward kernels, or a call they
cannot take, recomputes the reference under autograd from the saved operands instead, counted in
the report like a fallback. On Triton's interpreter (CPU) fused ops run one at a time in the
process, since the interpreter is not thread-safe (runtime.interpret.launch_lock).
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch

from codegen.launching import recording_now
from runtime.autotune import TuningKey, default_autotuner, device_label, shape_bucket
from runtime.bound import FastCall, Launch
from runtime.cache import source_hash
from runtime import library
from runtime.interpret import kernel_unavailable_reason, launch_lock
from runtime.loader import load_source
from runtime.plans import NO_PLAN_YET, Plans, signature, signature_check

NEVER = object()  # FusedOp.fast_path: no call of this op has a fast path
RECOMPUTED = "backward: recomputed in PyTorch from the saved inputs (no backward kernels yet)"
SPARSE_RECOMPUTED = ("backward: recomputed in PyTorch from the saved inputs (contextual sparsity is an inference "
                     "method: no backward kernels; the gradients are those of the sparse forward, as eager's)")
_recomputing: ContextVar[str | None] = ContextVar("flashfx_recomputing", default=None)  # why, while recomputing


@contextlib.contextmanager
def _autograd_on():
    """Grad mode, and autograd's dispatch keys back on: inside a custom op's kernel (the backward
    op's) the dispatcher excludes them, so nothing would be recorded."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set() - torch._C.DispatchKeySet(
        torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def grad_like(leaf: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """`grad` (zeros if None) laid out as torch.empty_like(leaf), which the backward's fake kernel returns."""
    like = torch.empty_like(leaf)
    if grad is not None and grad.stride() == like.stride():
        return grad
    return like.zero_() if grad is None else like.copy_(grad)


@dataclass
class Kernel:
    """One generated kernel, as `compiled.kernels` lists it."""

    name: str
    pattern: str
    source: str
    path: str
    config: dict = field(default_factory=dict)
    replaced: tuple[str, ...] = ()


class FusedOp(torch.nn.Module):
    pattern = ""

    def __init__(self, replaced: tuple[str, ...], mode: str = "default"):
        super().__init__()
        self.key = library.register(self)
        self.replaced = replaced
        self.mode = mode
        self.label = replaced[-1] if replaced else self.pattern
        self.kernels: dict[str, Kernel] = {}
        self.fallbacks: Counter[str] = Counter()
        self._loaded: dict[object, tuple[object, Kernel]] = {}
        self._configs: dict[tuple, dict] = {}
        self._plans = Plans()  # per call signature (runtime.plans)
        self._fast_paths = Plans()  # per plan_key: fast_path's function or None
        self._latest_fast_path: tuple | None = None  # (signature_check, grad mode, function) of the latest one

    def __call__(self, *args, **kwargs):
        """Run the op (forward); under the interpreter while holding the process-wide launch lock."""
        with launch_lock():
            return super().__call__(*args, **kwargs)

    @property
    def library_op(self) -> str:
        """The name of this op's custom op (runtime.library.OUTPUTS; its family's registry row declares it)."""
        return self.pattern

    @property
    def custom_op(self):
        """The custom op the lowered graph calls: library_op, or its twin returning residuals for the
        backward (`differentiable`), or for CUDA graphs to leave out (`host_synced`)."""
        return library.custom_op(library.twin(self.library_op, self.differentiable, self.host_synced))

    sync_free = False  # compiled for CUDA graphs (compiler.lower.CUDA_GRAPHS): the default path never syncs

    @property
    def host_sync_reason(self) -> str | None:
        """Why this op's default path reads tensor values on the host even when sync_free, or None."""
        return None

    @property
    def host_synced(self) -> bool:
        """Compiled for CUDA graphs but reading values on the host: Inductor runs it outside them."""
        return self.sync_free and self.host_sync_reason is not None

    differentiable = False  # captured for training: forward_saving returns the backward's residuals
    saves_outputs = False  # the backward reads the op's outputs (saved for it by autograd)
    recompute_reason = RECOMPUTED  # report()'s words for a backward recomputed in PyTorch

    def graph_output(self) -> Callable | None:
        """What the lowered graph applies to the custom op's result to rebuild what the replaced node
        returned, or None where that is the result itself: an op captured for training drops its residuals."""
        return library.visible_outputs if self.differentiable else None

    def prepare(self, *example) -> None:
        """Generate (render, store, load) the kernels this op will launch; `example` is its spec's
        (example operands or sizes, ir.fused.FusedSpec)."""
        raise NotImplementedError

    def output_like(self, *operands: torch.Tensor):
        """Empty tensors shaped, typed and strided like what forward(*operands) returns (the fake kernel)."""
        raise NotImplementedError

    def run_op(self, operands: list[torch.Tensor]):
        """What the custom op returns for `operands` (`_result`): through the fast path of their
        signature (`fast_path`) once there is one, else forward_saving. The latest fast path taken is
        tried first, by a signature check rather than the plan key, and called with no layer in
        between (FastCall.direct)."""
        latest = self._latest_fast_path
        if (latest is not None and latest[1] is torch.is_grad_enabled() and _recomputing.get() is None
                and not recording_now() and latest[0](operands)):
            return latest[2](*operands)
        fast_paths = self._fast_paths  # read once: another thread may drop it (compiled kernels take no lock)
        if fast_paths is None or recording_now():  # (a fast path calls FastCall.direct's replays: not recorded)
            return self._result(operands)
        key = self.plan_key(operands)
        fast = fast_paths.get(key, NO_PLAN_YET)
        if fast is NO_PLAN_YET:
            result = self._result(operands)
            fast = NEVER if self.differentiable else self.fast_path(operands)
            if fast is NEVER:
                self._fast_paths = None
            else:
                fast_paths.remember(key, fast)
            return result
        if fast is None:
            return self._result(operands)
        result = fast(*operands)
        direct = fast.direct() if isinstance(fast, FastCall) else fast
        self._latest_fast_path = (signature_check(operands), torch.is_grad_enabled(), direct)
        return result

    def _result(self, operands):
        """What the custom op returns: forward_saving's outputs as forward returns them; for an op captured
        for training (its _saving twin), as a tuple followed by the residuals list."""
        outputs, residuals = self.forward_saving(*operands)
        return (*library.as_tuple(outputs), residuals) if self.differentiable else outputs

    def fast_path(self, operands: list[torch.Tensor]) -> Callable | None:
        """A function of operands of this signature returning the op's outputs as forward does; None where
        there is none for them, NEVER where there is none for any (nor for an op captured for training,
        which is not asked). Called outside any launch recording. Asked once per signature, after
        forward_saving ran with these operands, so the plan and its bound launch (runtime.plans) exist;
        only a call whose every decision its plan holds (no check on values, no fallback) has one. It
        holds the plan's views, allocations and bound launch, nothing else, and is a FastCall
        (runtime.bound) where it can be, so that they are replayed as one call."""
        return NEVER

    def forward_saving(self, *operands: torch.Tensor) -> tuple[object, list[torch.Tensor]]:
        """(forward's outputs, the residuals its backward needs): none unless a family overrides it.
        The custom op calls it holding the launch lock (runtime.library)."""
        return self.forward(*operands), []

    def residuals_like(self, *operands: torch.Tensor) -> list[torch.Tensor]:
        """Empty tensors like the residuals forward_saving returns (the fake kernel)."""
        return []

    def backward(self, operands: list[torch.Tensor], outputs: list[torch.Tensor], residuals: list[torch.Tensor],
                 grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradient of each floating-point operand; families with backward kernels override this."""
        return self.recomputed_backward(operands, grads)

    def recomputed_backward(self, operands: list[torch.Tensor], grads: list[torch.Tensor],
                            reason: str | None = None) -> list[torch.Tensor]:
        """The gradient of each floating-point operand, from the reference recomputed under autograd
        (counted in the report as a fallback for `reason`, by default the op's recompute_reason)."""
        inputs = [t.detach().requires_grad_() if t.is_floating_point() else t for t in operands]
        token = _recomputing.set(reason or self.recompute_reason)
        try:
            with _autograd_on():
                outputs = self(*inputs)
        finally:
            _recomputing.reset(token)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]
        leaves = [t for t in inputs if t.is_floating_point()]
        found = torch.autograd.grad([out for out, _ in pairs], leaves, [grad for _, grad in pairs],
                                    allow_unused=True) if pairs else [None] * len(leaves)
        return [grad_like(leaf, grad) for grad, leaf in zip(found, leaves)]

    def why_not_kernel(self, tensors: list[torch.Tensor]) -> str | None:
        """Shared reasons to leave a call to PyTorch; subclasses add their own."""
        if _recomputing.get() is not None:
            return _recomputing.get()
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            return f"tensors on several devices {sorted(map(str, devices))}"
        (device,) = devices
        unavailable = kernel_unavailable_reason(device)
        if unavailable is not None:
            return unavailable
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return "inputs require grad (flashfx kernels are forward-only)"
        return None

    def load_kernel(self, spec, name: Callable, render: Callable) -> tuple[object, Kernel]:
        """(generated module, Kernel) for a hashable `spec`: rendered, cached and imported once
        (per spec and naming function: a forward and its backward may share a spec)."""
        loaded = self._loaded.get((name, spec))
        if loaded is None:
            kernel_name, source = name(spec), render(spec)
            module, path = load_source(kernel_name, source)
            kernel = self.kernels.setdefault(kernel_name, Kernel(kernel_name, self.pattern, source, str(path),
                                                                 replaced=self.replaced))
            loaded = self._loaded[name, spec] = (module, kernel)
        return loaded

    def plan_key(self, operands, *extra) -> tuple:
        """The key of the plan (runtime.plans) for a call with these operands: their signature, grad
        mode, the recompute in progress (why_not_kernel reads those), and what else the op's plan reads."""
        return signature(operands), torch.is_grad_enabled(), _recomputing.get(), *extra

    def run_planned(self, launch: Launch, tuning: Callable[[], tuple], like: torch.Tensor, run):
        """run(launcher), launcher(*tensors, **options) being launch.start: module.launch bound after
        its first call (runtime.plans), so every option that is not a tensor must be decided by the
        plan's key. On the launch's first call its config is tuned (or guessed) first, calling run once
        per candidate (run must be repeatable); tuning() gives tuned_config's (lengths, default, candidates)."""
        if launch.config is None:
            lengths, default, candidates = tuning()
            def run_candidate(config):
                return run(functools.partial(launch.module.launch, config=config))

            launch.config = self.tuned_config(launch.kernel, lengths, like, default, candidates, run_candidate)
        return run(launch.start)

    def fell_back(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def tuned_config(self, kernel: Kernel, lengths: tuple[int, ...], like: torch.Tensor,
                     default: Callable[[], dict], candidates: Callable[[], list[dict]], run) -> dict:
        """The launch config for `kernel` at these lengths (bucketed), via the autotune cache.

        Memoised per exact lengths, dtype and device: the hot path does one dict lookup."""
        memo_key = (kernel.name, lengths, like.dtype, like.device)
        if memo_key in self._configs:
            return self._configs[memo_key]
        key = TuningKey(
            kernel=kernel.name,
            source_hash=source_hash(kernel.source),
            bucket=tuple(shape_bucket(n) for n in lengths),
            dtype=str(like.dtype).removeprefix("torch."),
            device=device_label(like.device),
        )
        config = default_autotuner().config_for(key, default(), candidates(), run, mode=self.mode)
        kernel.config = dict(config)
        self._configs[memo_key] = config
        return config


class SavesChunkStates:
    """Mixed into a scan's FusedOp whose `_scan(tensors, save)` returns (outputs, residuals): the
    forward saves nothing; captured for training it saves [the states its backward kernels start
    from], shaped by the op's `_chunk_states_like(*tensors)` (the fake kernel's too)."""

    def forward(self, *tensors):
        outputs, _ = self._scan(tensors, save=False)
        return outputs

    def forward_saving(self, *tensors):
        if not self.differentiable:
            return super().forward_saving(*tensors)
        with launch_lock():
            return self._scan(tensors, save=True)

    def residuals_like(self, *tensors):
        return [self._chunk_states_like(*tensors)] if self.differentiable else []

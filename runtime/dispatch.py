"""Fused ops at run time: launch the generated kernel, or fall back to PyTorch.

A FusedOp is the nn.Module a compiler pass puts in the lowered fx graph in place of the
nodes it fused. On each call it decides:

    reason = why_not_kernel(tensors)      # device, dtype, autograd, unsupported shape...
    if reason is None: out = launch(...)  # generated Triton kernel (loaded from the cache)
    else:              out = reference(...) and count `reason` for report()

so it never returns an answer the kernel could not compute correctly.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from runtime.autotune import TuningKey, default_autotuner, device_label, shape_bucket
from runtime.cache import source_hash
from runtime.interpret import kernel_unavailable_reason


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
        self.replaced = replaced
        self.mode = mode
        self.label = replaced[-1] if replaced else self.pattern
        self.kernels: dict[str, Kernel] = {}
        self.fallbacks: Counter[str] = Counter()

    def why_not_kernel(self, tensors: list[torch.Tensor]) -> str | None:
        """Shared reasons to leave a call to PyTorch; subclasses add their own."""
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

    def fell_back(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def tuned_config(self, kernel: Kernel, lengths: tuple[int, ...], like: torch.Tensor,
                     default: dict, candidates: list[dict], run) -> dict:
        """The launch config for `kernel` at these lengths (bucketed), via the autotune cache."""
        key = TuningKey(
            kernel=kernel.name,
            source_hash=source_hash(kernel.source),
            bucket=tuple(shape_bucket(n) for n in lengths),
            dtype=str(like.dtype).removeprefix("torch."),
            device=device_label(like.device),
        )
        config = default_autotuner().config_for(key, default, candidates, run, mode=self.mode)
        kernel.config = dict(config)
        return config

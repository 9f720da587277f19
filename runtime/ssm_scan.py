"""Run time of the fused selective-scan ops: view graph tensors as kernel operands, launch the
generated kernel, or fall back to PyTorch.

The ssm_scan pass proves that a subgraph computes

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,    y_t = C_t · h_t  (+ D u_t)  (* silu(z_t))

from tensors it found in the graph, in whatever layout the model keeps them, and labels each
dim of each tensor with its role: b batch, d channel, n state, l time, g group of channels
sharing B and C, None for a unit dim. At run time the op views every tensor in the kernel's
layout (squeeze, permute, unsqueeze, expand: never a copy):

    scan:    u, delta, z (b, d, l)   A (d, n)   B, C (b, n, l) or (b, g, n, l)   D, delta_bias (d,)
    decode:  state (b, d, n)   x, dt, z (b, d)   A (d, n)   B, C (b, n) or (b, g, n)   D, dt_bias (d,)

Outputs are allocated the way eager code produced them (contiguous, same shape and dtype) and the
kernel writes through views of them: y, and the state after the last step when the graph reads
it (Hugging Face writes it into its cache). SelectiveScanOp runs a whole sequence from a zero
state; StateUpdateOp runs one decoding step from a carried state, into a fresh state tensor (the
graph's own copy_ into its cache, if any, stays in the graph).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from codegen import ssm_scan as ssm_codegen
from runtime.dispatch import FusedOp, Kernel

Labels = tuple[str | None, ...]


@dataclass(frozen=True)
class Operand:
    """A fused-op input: the kernel argument it feeds and the role of each of its dims."""

    name: str
    labels: Labels


@dataclass(frozen=True)
class Result:
    """An output the op allocates: eager's shape and dtype, and the role of each dim."""

    labels: Labels
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class SSMLayout:
    """Everything the pass proved about one fused scan or decode step."""

    operands: tuple[Operand, ...]
    sizes: tuple[tuple[str, int], ...]  # role -> size, e.g. (("b", 2), ("d", 64), ...)
    out: Result
    state: Result | None  # the final state, when the graph reads it
    softplus: bool = False

    def has(self, name: str) -> bool:
        return any(operand.name == name for operand in self.operands)

    @property
    def grouped(self) -> bool:
        return any("g" in operand.labels for operand in self.operands)


def arrange(x: torch.Tensor, labels: Labels, target: str, sizes: dict[str, int]) -> torch.Tensor:
    """View x, whose dims carry `labels`, with dims `target`; roles x lacks are broadcast."""
    x = x.squeeze(tuple(i for i, label in enumerate(labels) if label is None))
    present = [label for label in labels if label is not None]
    x = x.permute([present.index(role) for role in target if role in present])
    for position, role in enumerate(target):
        if role not in present:
            x = x.unsqueeze(position)
    return x.expand([sizes[role] for role in target])


class _SSMOp(FusedOp):
    """Shared by both ops: operand views, output allocation, kernel generation."""

    targets: dict[str, str] = {}
    out_target = ""
    state_target = "bdn"

    def __init__(self, replaced, layout: SSMLayout, mode: str = "default"):
        super().__init__(tuple(replaced), mode)
        self.layout = layout
        self.sizes = dict(layout.sizes)

    def _arguments(self, tensors) -> dict[str, torch.Tensor]:
        return {operand.name: arrange(tensor, operand.labels, self._target(operand.name), self.sizes)
                for operand, tensor in zip(self.layout.operands, tensors)}

    def _target(self, name: str) -> str:
        target = self.targets[name]
        return target.replace("b", "bg", 1) if name in ("B", "C") and self.layout.grouped else target

    def _allocate(self, result: Result, target: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = torch.empty(result.shape, dtype=result.dtype, device=device)
        return tensor, arrange(tensor, result.labels, target, self.sizes)

    def kernel_for(self, spec) -> tuple[object, Kernel]:
        return self.load_kernel(spec, ssm_codegen.kernel_name, self.render)

    @property
    def library_op(self) -> str:
        return "ssm_scan_with_state" if self.layout.state is not None else "ssm_scan"

    def output_like(self, *tensors):
        results = [self.layout.out] + ([self.layout.state] if self.layout.state is not None else [])
        outputs = tuple(torch.empty(result.shape, dtype=result.dtype, device=tensors[0].device) for result in results)
        return outputs if len(outputs) > 1 else outputs[0]

    def prepare(self) -> None:
        """Generate (render, store, load) the kernel this op launches."""
        self.kernel_for(self.spec())

    def _launch(self, spec, like: torch.Tensor, run, seqlen: int = 1) -> None:
        """Run `run(config)` with the config tuned (or guessed) for these sizes; `run` must be
        repeatable, since max-autotune calls it once per candidate."""
        module, kernel = self.kernel_for(spec)
        groups = self.sizes.get("g", 1) if self.layout.grouped else 1
        shape = dict(batch=self.sizes["b"], dim=self.sizes["d"], groups=groups, dstate=self.sizes["n"], seqlen=seqlen)
        config = self.tuned_config(
            kernel, (shape["batch"], shape["dim"], shape["dstate"], seqlen), like,
            default=lambda: ssm_codegen.default_config(spec, **shape),
            candidates=lambda: ssm_codegen.config_space(spec, shape["dstate"]),
            run=lambda config: run(module, config),
        )
        run(module, config)


class SelectiveScanOp(_SSMOp):
    """y (and the final state) of a selective scan over a whole sequence, from a zero state."""

    pattern = "ssm_scan"
    targets = {"u": "bdl", "delta": "bdl", "A": "dn", "B": "bnl", "C": "bnl", "D": "d", "z": "bdl",
               "delta_bias": "d"}
    out_target = "bdl"

    def spec(self) -> ssm_codegen.ScanSpec:
        return ssm_codegen.ScanSpec(has_D=self.layout.has("D"), has_z=self.layout.has("z"),
                                    has_delta_bias=self.layout.has("delta_bias"),
                                    delta_softplus=self.layout.softplus, grouped=self.layout.grouped,
                                    return_last_state=self.layout.state is not None)

    def render(self, spec) -> str:
        return ssm_codegen.render_scan(spec)

    def forward(self, *tensors):
        args = self._arguments(tensors)
        out, out_view = self._allocate(self.layout.out, self.out_target, args["u"].device)
        state, state_view = (self._allocate(self.layout.state, self.state_target, out.device)
                             if self.layout.state is not None else (None, None))
        reason = self.why_not_kernel(list(tensors)) or ssm_codegen.unsupported_reason(
            **args, last_state=state_view, out=out_view)
        if reason is None:
            def run(module, config):
                module.launch(**args, out=out_view, delta_softplus=self.layout.softplus, last_state=state_view,
                              config=config)

            self._launch(self.spec(), args["u"], run, seqlen=self.sizes["l"])
        else:
            self.fell_back(reason)
            y, h, _ = ssm_codegen.selective_scan_reference(**args, delta_softplus=self.layout.softplus)
            out_view.copy_(y)
            if state_view is not None:
                state_view.copy_(h)
        return out if state is None else (out, state)


class StateUpdateOp(_SSMOp):
    """One decoding step: y and the new state from a carried state (left unchanged)."""

    pattern = "ssm_scan"
    library_op = "ssm_state_update"
    targets = {"state": "bdn", "x": "bd", "dt": "bd", "A": "dn", "B": "bn", "C": "bn", "D": "d", "z": "bd",
               "dt_bias": "d"}
    out_target = "bd"

    def spec(self) -> ssm_codegen.StateUpdateSpec:
        return ssm_codegen.StateUpdateSpec(has_D=self.layout.has("D"), has_z=self.layout.has("z"),
                                           has_dt_bias=self.layout.has("dt_bias"), dt_softplus=self.layout.softplus,
                                           grouped=self.layout.grouped)

    def render(self, spec) -> str:
        return ssm_codegen.render_state_update(spec)

    def forward(self, *tensors):
        args = self._arguments(tensors)
        carried = args.pop("state")
        out, out_view = self._allocate(self.layout.out, self.out_target, carried.device)
        state, state_view = self._allocate(self.layout.state, self.state_target, carried.device)
        reason = self.why_not_kernel(list(tensors)) or ssm_codegen.state_update_unsupported_reason(
            state_view, **args, out=out_view)
        if reason is None:
            def run(module, config):
                state_view.copy_(carried)
                module.launch(state_view, **args, out=out_view, dt_softplus=self.layout.softplus, config=config)

            self._launch(self.spec(), args["x"], run)
        else:
            self.fell_back(reason)
            y, h = ssm_codegen.state_update_reference(carried, **args, dt_softplus=self.layout.softplus)
            out_view.copy_(y)
            state_view.copy_(h)
        return out, state

"""Run time of the fused SSD ops (Mamba-2): view graph tensors as kernel operands, launch the
generated kernels, or fall back to PyTorch.

The ssd_scan pass proves that a subgraph computes, per head h with a scalar decay,

    S_t = exp(Δ_t A_h) S_{t-1} + Δ_t x_t ⊗ B_t,   y_t = S_t C_t  (+ D x_t)  (* silu(z_t))

from tensors it found in the graph, in whatever layout the model keeps them, and labels each
dim of each tensor with the roles it holds: b batch, l time, h head, p head dim, n state, g group
of heads sharing B and C; a dim may hold several roles merged in that order ("hp": the heads'
channels side by side), and "" marks a unit dim. At run time the op views every tensor in the
kernel's layout (split merged dims, squeeze, permute, unsqueeze, expand: never a copy unless a
merged dim's strides forbid a view):

    scan:    x, z (b, l, h, p)   dt, A (b, l, h)   B, C (b, l, g, n)   D (h, p)   dt_bias (h,)
             initial_state, final_state (b, h, p, n)    (no dt: a discrete SSD, Δ = 1)
    decode:  state (b, h, p, n)   x, z (b, h, p)   dt, A (b, h)   B, C (b, g, n)   D (h, p)   dt_bias (h,)

Outputs are allocated the way eager code produced them (shape and dtype, contiguous) and the
kernels write through views of them: y, and the final state when the graph reads it (the scan),
or the new state (the decode step; the graph's own copy_ into its cache stays in the graph).
"""
from __future__ import annotations

import torch

from codegen import ssd_scan as ssd_codegen
from ir.fused import SSD_SCAN_DIMS, SSD_STATE_UPDATE_DIMS, Result, SSDLayout
from runtime.dispatch import FusedOp, Kernel

Labels = tuple[str, ...]


def arrange(x: torch.Tensor, labels: Labels, target: str, sizes: dict[str, int]) -> torch.Tensor:
    """View x, whose dims hold `labels`, with dims `target`; roles x lacks are broadcast."""
    if any(len(label) > 1 for label in labels):
        x = _split(x, labels, sizes)
        labels = tuple(role for label in labels for role in (label if len(label) > 1 else (label,)))
    x = x.squeeze(tuple(i for i, role in enumerate(labels) if role == ""))
    present = [role for role in labels if role != ""]
    x = x.permute([present.index(role) for role in target if role in present])
    for position, role in enumerate(target):
        if role not in present:
            x = x.unsqueeze(position)
    return x.expand([sizes[role] for role in target])


def _split(x: torch.Tensor, labels: Labels, sizes: dict[str, int]) -> torch.Tensor:
    """x with each merged dim split into its roles."""
    shape = [part for label, size in zip(labels, x.shape)
             for part in ([sizes[role] for role in label] if len(label) > 1 else [size])]
    try:
        return x.view(shape)
    except RuntimeError:  # strides that do not split (a merged dim of a transposed tensor): copy
        return x.reshape(shape)


class _SSDOp(FusedOp):
    """Shared by the scan and the decode step: operand views, outputs, kernel generation, tuning."""

    pattern = "ssd_scan"
    targets: dict[str, str] = {}
    out_target = ""

    def __init__(self, replaced, layout: SSDLayout, mode: str = "default"):
        super().__init__(tuple(replaced), mode)
        self.layout = layout
        self.sizes = dict(layout.sizes)

    def _arguments(self, tensors) -> dict[str, torch.Tensor]:
        """The kernel's arguments viewed from the operands; a discrete SSD (no dt operand) steps by 1."""
        args = {operand.name: arrange(tensor, operand.labels, self.targets[operand.name], self.sizes)
                for operand, tensor in zip(self.layout.operands, tensors)}
        if "dt" not in args:
            ones = torch.ones((), dtype=torch.float32, device=tensors[0].device)
            args["dt"] = ones.expand([self.sizes[role] for role in self.targets["dt"]])
        return args

    def _allocate(self, result: Result, target: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = torch.empty(result.shape, dtype=result.dtype, device=device)
        return tensor, arrange(tensor, result.labels, target, self.sizes)

    def output_like(self, *tensors):
        results = [self.layout.out] + ([self.layout.state] if self.layout.state is not None else [])
        outputs = tuple(torch.empty(result.shape, dtype=result.dtype, device=tensors[0].device) for result in results)
        return outputs if len(outputs) > 1 else outputs[0]

    def kernel_for(self, spec) -> tuple[object, Kernel]:
        return self.load_kernel(spec, ssd_codegen.kernel_name, self.render)

    def prepare(self) -> None:
        """Generate (render, store, load) the kernel this op launches."""
        self.kernel_for(self.spec())

    def _options(self) -> dict:
        return dict(dt_softplus=self.layout.dt_softplus, dt_limit=self.layout.dt_limit)

    def _launch(self, like: torch.Tensor, run, seqlen: int = 1) -> None:
        """Run `run(module, config)` with the config tuned (or guessed) for these sizes; `run` must be
        repeatable, since max-autotune calls it once per candidate."""
        spec = self.spec()
        module, kernel = self.kernel_for(spec)
        shape = dict(headdim=self.sizes["p"], dstate=self.sizes["n"])
        scan = dict(seqlen=seqlen) if isinstance(spec, ssd_codegen.SSDSpec) else {}
        lengths = (self.sizes["b"], seqlen, self.sizes["h"], self.sizes["p"], self.sizes["n"])
        config = self.tuned_config(
            kernel, lengths, like,
            default=lambda: ssd_codegen.default_config(spec, **scan, **shape, itemsize=like.element_size()),
            candidates=lambda: ssd_codegen.config_space(spec, **scan, **shape),
            run=lambda config: run(module, config),
        )
        run(module, config)


class SSDScanOp(_SSDOp):
    """y (and the final state) of an SSD scan over a whole sequence."""

    targets = SSD_SCAN_DIMS
    out_target = SSD_SCAN_DIMS["out"]

    @property
    def library_op(self) -> str:
        return "ssd_scan_with_state" if self.layout.state is not None else "ssd_scan"

    def spec(self) -> ssd_codegen.SSDSpec:
        has = self.layout.has
        return ssd_codegen.SSDSpec(has_D=has("D"), has_z=has("z"), has_dt_bias=has("dt_bias"),
                                   dt_softplus=self.layout.dt_softplus, dt_limit=self.layout.dt_limit is not None,
                                   has_initial_state=has("initial_state"),
                                   return_final_state=self.layout.state is not None)

    def render(self, spec) -> str:
        return ssd_codegen.render_scan(spec)

    def forward(self, *tensors):
        args = self._arguments(tensors)
        out, out_view = self._allocate(self.layout.out, self.out_target, args["x"].device)
        state, state_view = (self._allocate(self.layout.state, "bhpn", out.device)
                             if self.layout.state is not None else (None, None))
        reason = self.why_not_kernel(list(tensors)) or ssd_codegen.unsupported_reason(
            **args, out=out_view, final_state=state_view)
        if reason is None:
            def run(module, config):
                module.launch(**args, out=out_view, final_state=state_view, config=config, **self._options())

            self._launch(args["x"], run, seqlen=self.sizes["l"])
        else:
            self.fell_back(reason)
            y, h = ssd_codegen.ssd_scan_reference(**args, **self._options())
            out_view.copy_(y)
            if state_view is not None:
                state_view.copy_(h)
        return out if state is None else (out, state)


class SSDStateUpdateOp(_SSDOp):
    """One decoding step: y and the new state from a carried state (left unchanged)."""

    library_op = "ssd_state_update"
    targets = SSD_STATE_UPDATE_DIMS
    out_target = SSD_STATE_UPDATE_DIMS["out"]

    def spec(self) -> ssd_codegen.SSDStateUpdateSpec:
        has = self.layout.has
        return ssd_codegen.SSDStateUpdateSpec(has_D=has("D"), has_z=has("z"), has_dt_bias=has("dt_bias"),
                                              dt_softplus=self.layout.dt_softplus,
                                              dt_limit=self.layout.dt_limit is not None)

    def render(self, spec) -> str:
        return ssd_codegen.render_state_update(spec)

    def forward(self, *tensors):
        args = self._arguments(tensors)
        out, out_view = self._allocate(self.layout.out, self.out_target, args["x"].device)
        state, state_view = self._allocate(self.layout.state, "bhpn", out.device)
        reason = self.why_not_kernel(list(tensors)) or ssd_codegen.state_update_unsupported_reason(
            **args, new_state=state_view, out=out_view)
        if reason is None:
            def run(module, config):
                module.launch(**args, new_state=state_view, out=out_view, config=config, **self._options())

            self._launch(args["x"], run)
        else:
            self.fell_back(reason)
            y, h = ssd_codegen.ssd_state_update_reference(**args, **self._options())
            out_view.copy_(y)
            state_view.copy_(h)
        return out, state


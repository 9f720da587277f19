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

Training (a scan captured with grad): the forward also saves the state entering each chunk of
saved_chunk(L) steps, (b, chunks, h, p, n) float32 (codegen/ssd_scan_backward.py says why), and
the backward runs the generated backward kernels from them: dx and dz are written straight into
tensors shaped like their operands (a float32 buffer summed down when the op's view of one
broadcasts); the other gradients come back as float32 tensors in the kernel's layout and are
summed over what the op's view broadcast, in each operand's shape, dtype and strides (`unarrange`).
"""
from __future__ import annotations

import torch

from codegen import ssd_scan as ssd_codegen
from codegen import ssd_scan_backward as ssd_backward
from codegen.launching import fresh
from ir.fused import SSD_SCAN_DIMS, SSD_STATE_UPDATE_DIMS, Operand, Result, SSDLayout
from runtime.bound import Launch
from runtime.dispatch import NEVER, FusedOp, Kernel, SavesChunkStates, grad_like
from runtime.interpret import launch_lock
from runtime.scan_plans import PlannedScan, scan_start

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


def unarrange(grad: torch.Tensor, labels: Labels, target: str, like: torch.Tensor,
              sizes: dict[str, int]) -> torch.Tensor:
    """The gradient of `like` from `grad`, the gradient of arrange(like, labels, target, sizes): summed
    over the roles arrange broadcast (in grad's dtype), in like's shape, dtype and strides."""
    present = [role for label in labels for role in label]
    broadcast = [i for i, role in enumerate(target) if role not in present]
    grad = grad.sum(broadcast) if broadcast else grad
    kept = [role for role in target if role in present]
    grad = grad.permute([kept.index(role) for role in present])
    split = [part for label, size in zip(labels, like.shape)
             for part in ([sizes[role] for role in label] if len(label) > 1 else [size] * len(label))]
    return grad_like(like, grad.sum_to_size(split).reshape(like.shape).to(like.dtype))


def _broadcasts(view: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for stride, size in zip(view.stride(), view.shape))


def _split(x: torch.Tensor, labels: Labels, sizes: dict[str, int]) -> torch.Tensor:
    """x with each merged dim split into its roles."""
    shape = [part for label, size in zip(labels, x.shape)
             for part in ([sizes[role] for role in label] if len(label) > 1 else [size])]
    try:
        return x.view(shape)
    except RuntimeError:  # strides that do not split (a merged dim of a transposed tensor): copy
        return x.reshape(shape)


class _SSDOp(PlannedScan, FusedOp):
    """Shared by the scan and the decode step: operand views, outputs, kernel generation, tuning."""

    pattern = "ssd_scan"
    targets: dict[str, str] = {}
    out_target = ""
    state_target = "bhpn"

    def __init__(self, replaced, layout: SSDLayout, mode: str = "default"):
        super().__init__(tuple(replaced), mode)
        self.layout = layout
        self.sizes = dict(layout.sizes)

    def _arguments(self, tensors) -> dict[str, torch.Tensor]:
        """The kernel's arguments viewed from the operands; a discrete SSD (no dt operand) steps by 1."""
        args = {operand.name: arrange(tensor, operand.labels, self.targets[operand.name], self.sizes)
                for operand, tensor in zip(self.layout.operands, tensors)}
        return self._completed(args, tensors[0].device)

    def _completed(self, args: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        if "dt" not in args:
            ones = fresh(torch.ones, (), dtype=torch.float32, device=device)
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
        _, default, candidates = self._tuning(like, seqlen)
        self._tuned_run(self.kernel_for(self.spec()), like, run, seqlen, default=default, candidates=candidates)

    def _launch_planned(self, launch: Launch, like: torch.Tensor, run, seqlen: int = 1) -> None:
        """run(launcher) with the plan's launch (run_planned), config tuned (or guessed) for these sizes."""
        self.run_planned(launch, lambda: self._tuning(like, seqlen), like, run)

    def _tuning(self, like: torch.Tensor, seqlen: int) -> tuple:
        """(lengths keying the forward kernel's config, default config, candidate configs)."""
        spec = self.spec()
        shape = dict(headdim=self.sizes["p"], dstate=self.sizes["n"])
        scan = dict(seqlen=seqlen) if isinstance(spec, ssd_codegen.SSDSpec) else {}
        return ((self.sizes["b"], seqlen, self.sizes["h"], self.sizes["p"], self.sizes["n"]),
                lambda: ssd_codegen.default_config(spec, **scan, **shape, itemsize=like.element_size()),
                lambda: ssd_codegen.config_space(spec, **scan, **shape))

    def _tuned_run(self, loaded: tuple[object, Kernel], like: torch.Tensor, run, seqlen: int, default,
                   candidates) -> None:
        module, kernel = loaded
        lengths = (self.sizes["b"], seqlen, self.sizes["h"], self.sizes["p"], self.sizes["n"])
        config = self.tuned_config(kernel, lengths, like, default=default, candidates=candidates,
                                   run=lambda config: run(module, config))
        run(module, config)


class SSDScanOp(SavesChunkStates, _SSDOp):
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

    def fast_path(self, operands):
        if self.differentiable:
            return NEVER
        return self._fast_path(self._plans.get(self.plan_key(operands, False)), _start_scan)

    def _chunk_states_like(self, *tensors) -> torch.Tensor:
        """Saved for training: the state entering each chunk of saved_chunk(L) steps, (b, chunks, h, p, n)
        in float32, from which the backward kernels start."""
        sizes = self.sizes
        shape = (sizes["b"], -(-sizes["l"] // self._saved_chunk()), sizes["h"], sizes["p"], sizes["n"])
        return torch.empty(shape, dtype=torch.float32, device=tensors[0].device)

    def _saved_chunk(self) -> int:
        return ssd_backward.saved_chunk(self.sizes["l"])

    def _scan(self, tensors, save: bool) -> tuple[object, list[torch.Tensor]]:
        plan = self._planned(tensors, lambda args, out, state=None: ssd_codegen.unsupported_reason(
            **args, out=out, final_state=state), self.spec, save)
        args = self._planned_arguments(plan, tensors)
        (out, out_view), (state, state_view) = (self._planned_outputs(plan, tensors[0].device) + [(None, None)])[:2]
        chunk_states = self._chunk_states_like(*tensors) if save else None
        if plan.reason is None and save:
            def run(module, config):  # tuned or not, the saved states are those of the backward's chunks
                module.launch(**args, out=out_view, final_state=state_view, chunk_states=chunk_states,
                              config=_with_chunk(config, self._saved_chunk()), **self._options())

            self._launch(args["x"], run, seqlen=self.sizes["l"])
        elif plan.reason is None:
            self._launch_planned(plan.launch, args["x"], lambda launcher: _start_scan(
                launcher, dict(args, **self._options()), out_view, state_view), seqlen=self.sizes["l"])
        else:
            self.fell_back(plan.reason)
            saving = dict(chunk=self._saved_chunk(), chunk_states=True) if save else {}
            y, h, *saved = ssd_codegen.ssd_scan_reference(**args, **self._options(), **saving)
            out_view.copy_(y)
            if state_view is not None:
                state_view.copy_(h)
            if chunk_states is not None:
                chunk_states.copy_(saved[0])
        outputs = out if state is None else (out, state)
        return outputs, [] if chunk_states is None else [chunk_states]

    def backward(self, operands, outputs, residuals, grads):
        """The backward kernels from the saved chunk states; where they cannot run (captured for
        inference, a dtype, device or size the kernels do not take), the reference recomputed under
        autograd, the reason counted for report()."""
        args, output_grads = self._arguments(operands), self._output_gradients(grads)
        reason = ("no chunk states: captured for inference" if not residuals else
                  self.why_not_kernel(list(operands) + list(grads))
                  or ssd_codegen.unsupported_reason(**args, out=output_grads["dout"],
                                                    final_state=output_grads["dfinal_state"])
                  or ssd_backward.backward_unsupported_reason(self.sizes["p"], self.sizes["n"]))
        if reason is not None:
            return self.recomputed_backward(operands, grads, reason=f"backward: {reason}")
        with launch_lock():
            return self._backward_kernels(operands, args, residuals[0], output_grads)

    def _output_gradients(self, grads) -> dict[str, torch.Tensor | None]:
        """dout and dfinal_state in the kernel's layout (dfinal_state None without a final state)."""
        state = self.layout.state
        return dict(dout=arrange(grads[0], self.layout.out.labels, self.out_target, self.sizes),
                    dfinal_state=None if state is None else arrange(grads[1], state.labels, "bhpn", self.sizes))

    def _backward_kernels(self, operands, args, chunk_states, grads) -> list[torch.Tensor]:
        written = {operand.name: self._gradient_buffer(operand, tensor)
                   for operand, tensor in zip(self.layout.operands, operands) if operand.name in ("x", "z")}
        views = {name: view for name, (_, view) in written.items()}
        sums = {}

        def run(module, config):
            sums.update(module.launch(**args, **grads, chunk_states=chunk_states, dx=views["x"], dz=views.get("z"),
                                      chunk=self._saved_chunk(), config=config, **self._options()))

        sizes = self.sizes
        shape = dict(seqlen=sizes["l"], heads=sizes["h"], groups=sizes["g"], headdim=sizes["p"], dstate=sizes["n"])
        loaded = self.load_kernel(self.spec(), ssd_backward.backward_kernel_name, ssd_backward.render_scan_backward)
        self._tuned_run(loaded, args["x"], run, sizes["l"],
                        default=lambda: ssd_backward.backward_default_config(
                            batch=sizes["b"], **shape, itemsize=args["x"].element_size()),
                        candidates=lambda: ssd_backward.backward_config_space(**shape))
        in_place = {name: grad for name, (grad, _) in written.items() if grad is not None}
        arranged = {**views, **sums}
        return [grad_like(tensor, in_place[operand.name]) if operand.name in in_place
                else unarrange(arranged[operand.name], operand.labels, self.targets[operand.name], tensor, sizes)
                for operand, tensor in zip(self.layout.operands, operands) if tensor.is_floating_point()]

    def _gradient_buffer(self, operand: Operand, tensor: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the gradient, its kernel view) for x or z: a contiguous tensor of the operand's shape, which
        every merged dim views, when the kernel's view of the operand broadcasts nothing; else (None, a
        float32 buffer summed afterwards)."""
        grad = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        view = arrange(grad, operand.labels, self.targets[operand.name], self.sizes)
        if not _broadcasts(view):
            return grad, view
        return None, torch.empty(view.shape, dtype=torch.float32, device=tensor.device)


_start_scan = scan_start("final_state")  # SSDScanOp's launch


def _start_step(launch, args, out, state) -> None:
    """SSDStateUpdateOp's launch (a launcher or its bound replay)."""
    launch(**args, new_state=state, out=out)


def _with_chunk(config: dict, chunk: int) -> dict:
    """A forward config run with chunks of `chunk` steps, its tiles no longer than a chunk."""
    return dict(config, CHUNK=chunk, BLOCK_M=min(config["BLOCK_M"], chunk), BLOCK_K=min(config["BLOCK_K"], chunk))


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

    def fast_path(self, operands):
        return self._fast_path(self._plans.get(self.plan_key(operands)), _start_step)

    def forward(self, *tensors):
        plan = self._planned(tensors, lambda args, out, state: ssd_codegen.state_update_unsupported_reason(
            **args, new_state=state, out=out), self.spec)
        args = self._planned_arguments(plan, tensors)
        (out, out_view), (state, state_view) = self._planned_outputs(plan, tensors[0].device)
        if plan.reason is None:
            self._launch_planned(plan.launch, args["x"], lambda launcher: _start_step(
                launcher, dict(args, **self._options()), out_view, state_view))
        else:
            self.fell_back(plan.reason)
            y, h = ssd_codegen.ssd_state_update_reference(**args, **self._options())
            out_view.copy_(y)
            state_view.copy_(h)
        return out, state


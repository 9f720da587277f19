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

Training (an op captured with grad): the scan also saves the state entering every CHUNK_LEN steps,
and its backward runs codegen/ssm_scan_backward.py's kernel from those: du, ddelta and dz are
written straight into tensors laid out like their operands (a float32 buffer summed down when
the op's view of one broadcasts), dA, dB, dC, dD and d delta_bias come back as float32 sums and
are reduced to each operand's shape, dtype and strides (`unarrange`).
"""
from __future__ import annotations

import torch

from codegen import ssm_scan as ssm_codegen
from codegen import ssm_scan_backward as ssm_backward
from codegen.launching import fresh
from ir.fused import SSM_SCAN_DIMS, Operand, Result, SSMLayout
from runtime.bound import Launch
from runtime.dispatch import NEVER, FusedOp, Kernel, SavesChunkStates, grad_like
from runtime.interpret import launch_lock
from runtime.scan_plans import PlannedScan, scan_start

Labels = tuple[str | None, ...]


def arrange(x: torch.Tensor, labels: Labels, target: str, sizes: dict[str, int]) -> torch.Tensor:
    """View x, whose dims carry `labels`, with dims `target`; roles x lacks are broadcast."""
    x = x.squeeze(tuple(i for i, label in enumerate(labels) if label is None))
    present = [label for label in labels if label is not None]
    x = x.permute([present.index(role) for role in target if role in present])
    for position, role in enumerate(target):
        if role not in present:
            x = x.unsqueeze(position)
    return x.expand([sizes[role] for role in target])


def unarrange(grad: torch.Tensor, labels: Labels, target: str, like: torch.Tensor) -> torch.Tensor:
    """The gradient of `like` from `grad`, the gradient of arrange(like, labels, target, ...): summed
    over the roles arrange broadcast, in like's dims, shape, dtype and strides."""
    present = [label for label in labels if label is not None]
    broadcast = [i for i, role in enumerate(target) if role not in present]
    grad = grad.sum(broadcast) if broadcast else grad
    kept = [role for role in target if role in present]
    grad = grad.permute([kept.index(role) for role in present])
    grad = grad.sum_to_size([size for size, label in zip(like.shape, labels) if label is not None])
    return grad_like(like, grad.reshape(like.shape).to(like.dtype))


def _broadcasts(view: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for stride, size in zip(view.stride(), view.shape))


class _SSMOp(PlannedScan, FusedOp):
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

    def _shape(self, seqlen: int) -> dict[str, int]:
        groups = self.sizes.get("g", 1) if self.layout.grouped else 1
        return dict(batch=self.sizes["b"], dim=self.sizes["d"], groups=groups, dstate=self.sizes["n"], seqlen=seqlen)

    def _launch(self, spec, launch: Launch, like: torch.Tensor, run, seqlen: int = 1) -> None:
        """run(launcher) with the planned forward kernel's launcher for `spec` (run_planned), config tuned
        (or guessed) for these sizes."""
        def tuning():
            shape = self._shape(seqlen)
            return ((shape["batch"], shape["dim"], shape["dstate"], shape["seqlen"]),
                    lambda: ssm_codegen.default_config(spec, **shape),
                    lambda: ssm_codegen.config_space(spec, shape["dstate"]))

        self.run_planned(launch, tuning, like, run)

    def _tuned_run(self, loaded: tuple[object, Kernel], like: torch.Tensor, run, shape: dict[str, int],
                   default, candidates) -> None:
        module, kernel = loaded
        config = self.tuned_config(kernel, (shape["batch"], shape["dim"], shape["dstate"], shape["seqlen"]), like,
                                   default=default, candidates=candidates, run=lambda config: run(module, config))
        run(module, config)


class SelectiveScanOp(SavesChunkStates, _SSMOp):
    """y (and the final state) of a selective scan over a whole sequence, from a zero state."""

    pattern = "ssm_scan"
    targets = SSM_SCAN_DIMS
    out_target = SSM_SCAN_DIMS["out"]

    def spec(self, chunk_states: bool = False) -> ssm_codegen.ScanSpec:
        return ssm_codegen.ScanSpec(has_D=self.layout.has("D"), has_z=self.layout.has("z"),
                                    has_delta_bias=self.layout.has("delta_bias"),
                                    delta_softplus=self.layout.softplus, grouped=self.layout.grouped,
                                    return_last_state=self.layout.state is not None, chunk_states=chunk_states)

    def render(self, spec) -> str:
        return ssm_codegen.render_scan(spec)

    def _chunk_states_like(self, *tensors) -> torch.Tensor:
        """Saved for training: the state entering every CHUNK_LEN steps (b, d, L / CHUNK_LEN, n), from
        which the backward kernel recomputes the rest."""
        return torch.empty(self._chunk_states_shape(), dtype=ssm_codegen.compute_dtype(*tensors),
                           device=tensors[0].device)

    def _chunk_states_shape(self) -> tuple[int, ...]:
        chunks = -(-self.sizes["l"] // ssm_codegen.CHUNK_LEN)
        return self.sizes["b"], self.sizes["d"], chunks, self.sizes["n"]

    def _scan(self, tensors, save: bool) -> tuple[object, list[torch.Tensor]]:
        plan = self._planned(tensors, lambda args, out, state=None: ssm_codegen.unsupported_reason(
            **args, last_state=state, out=out), lambda: self.spec(chunk_states=save), save)
        args = self._planned_arguments(plan, tensors)
        (out, out_view), (state, state_view) = (self._planned_outputs(plan, tensors[0].device) + [(None, None)])[:2]
        chunk_states = self._chunk_states_like(*tensors) if save else None
        if plan.reason is None:
            options = dict(delta_softplus=self.layout.softplus, chunk_states=chunk_states)
            self._launch(plan.spec, plan.launch, args["u"], lambda launcher: _start_scan(
                launcher, dict(args, **options), out_view, state_view), seqlen=self.sizes["l"])
        else:
            self.fell_back(plan.reason)
            y, h, checkpoints = ssm_codegen.selective_scan_reference(**args, delta_softplus=self.layout.softplus)
            out_view.copy_(y)
            if state_view is not None:
                state_view.copy_(h)
            if chunk_states is not None:
                chunk_states.copy_(checkpoints)
        outputs = out if state is None else (out, state)
        return outputs, [] if chunk_states is None else [chunk_states]

    def fast_path(self, operands):
        if self.differentiable:
            return NEVER
        return self._fast_path(self._plans.get(self.plan_key(operands, False)), _start_scan)

    def backward(self, operands, outputs, residuals, grads):
        """The backward kernel from the saved chunk states; where it cannot run (no chunk states,
        a dtype or device the kernels do not take), the reference recomputed under autograd."""
        args, output_grads = self._arguments(operands), self._output_gradients(grads)
        reason = ("no chunk states: captured for inference" if not residuals else
                  self.why_not_kernel(list(operands) + list(grads))
                  or ssm_codegen.unsupported_reason(**args, out=output_grads["dout"],
                                                    last_state=output_grads["dlast_state"]))
        if reason is not None:
            return self.recomputed_backward(operands, grads)
        with launch_lock():
            return self._backward_kernel(operands, args, residuals[0], output_grads)

    def _output_gradients(self, grads) -> dict[str, torch.Tensor | None]:
        """dout and dlast_state in the kernel's layout (dlast_state None without a final state)."""
        state = self.layout.state
        return dict(dout=arrange(grads[0], self.layout.out.labels, self.out_target, self.sizes),
                    dlast_state=None if state is None else arrange(grads[1], state.labels, self.state_target,
                                                                   self.sizes))

    def _backward_kernel(self, operands, args, chunk_states, grads) -> list[torch.Tensor]:
        written = {operand.name: self._gradient_buffer(operand, tensor)
                   for operand, tensor in zip(self.layout.operands, operands) if operand.name in ("u", "delta", "z")}
        views = {name: view for name, (_, view) in written.items()}
        sums = {}

        def run(module, config):
            sums.update(module.launch(**args, **grads, chunk_states=chunk_states, du=views["u"],
                                      ddelta=views["delta"], dz=views.get("z"), delta_softplus=self.layout.softplus,
                                      config=config))

        shape = self._shape(self.sizes["l"])
        loaded = self.load_kernel(self.spec(), ssm_backward.backward_kernel_name, ssm_backward.render_scan_backward)
        self._tuned_run(loaded, args["u"], run, shape,
                        default=lambda: ssm_backward.backward_default_config(**shape),
                        candidates=lambda: ssm_backward.backward_config_space(shape["dstate"]))
        in_place = {name: grad for name, (grad, _) in written.items() if grad is not None}
        arranged = {**views, **sums}
        return [in_place[operand.name] if operand.name in in_place
                else unarrange(arranged[operand.name], operand.labels, self._target(operand.name), tensor)
                for operand, tensor in zip(self.layout.operands, operands)]

    def _gradient_buffer(self, operand: Operand, tensor: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the gradient, its kernel view) for u, delta or z: written in place when the kernel's view
        of the operand broadcasts nothing; else (None, a float32 buffer summed afterwards)."""
        grad = torch.empty_like(tensor)
        view = arrange(grad, operand.labels, self._target(operand.name), self.sizes)
        if not _broadcasts(view):
            return grad, view
        return None, torch.empty(view.shape, dtype=torch.float32, device=tensor.device)


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

    def fast_path(self, operands):
        return self._fast_path(self._plans.get(self.plan_key(operands)), _start_step)

    def forward(self, *tensors):
        plan = self._planned(tensors, lambda args, out, state: ssm_codegen.state_update_unsupported_reason(
            state, **{name: arg for name, arg in args.items() if name != "state"}, out=out), self.spec)
        args = self._planned_arguments(plan, tensors)
        carried = args.pop("state")
        (out, out_view), (state, state_view) = self._planned_outputs(plan, carried.device)
        if plan.reason is None:
            self._launch(plan.spec, plan.launch, args["x"], lambda launcher: _start_step(
                launcher, dict(args, state=carried, dt_softplus=self.layout.softplus), out_view, state_view))
        else:
            self.fell_back(plan.reason)
            y, h = ssm_codegen.state_update_reference(carried, **args, dt_softplus=self.layout.softplus)
            out_view.copy_(y)
            state_view.copy_(h)
        return out, state


_start_scan = scan_start("last_state")  # SelectiveScanOp's launch


def _start_step(launch, args, out, state) -> None:
    """StateUpdateOp's launch (its launcher, or the bound replay): the new state starts as a copy of
    the carried one, which it pops from args (a dict made for the call)."""
    fresh(_copied, state, args.pop("state"))
    launch(state, **args, out=out)


def _copied(into: torch.Tensor, source: torch.Tensor) -> tuple:
    """A fresh(...) call that makes no tensor: `into` written with `source`."""
    into.copy_(source)
    return ()

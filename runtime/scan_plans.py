"""Per-signature plans of the scan ops: the selective scan and Mamba-2's SSD scan, and their decode
steps. Both families view their operands by role (their `arrange`) and allocate y, and a state when
the op returns one, the same way, so they plan alike (runtime.plans):

    plan = op._planned(tensors, reason_of, spec_of, *extra)   # the kernel's views of the operands and
                                                               # outputs, why not the kernel, its launch
    args = op._planned_arguments(plan, tensors)                # the kernel's operands by name
    outputs = op._planned_outputs(plan, device)                # [(tensor, the kernel's view of it)]
    fast = op._fast_path(plan, start)                          # a fast_path's function for the plan

A plan whose operand views copy (an SSD operand whose merged dims do not split as a view) keeps no
views: its arguments are arranged again on each call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from codegen.launching import fresh
from runtime.bound import Bound, FastCall, Launch
from runtime.plans import IDENTITY, NO_PLAN_YET, Allocation, View, views_between


def scan_start(state_name: str):
    """A scan op's launch from (launcher or its bound replay, kernel operands by name, the kernel's view
    of y, of the final state or None), the final state passed as `state_name`."""
    def start(launch, args, out, state=None) -> None:
        if state is None:
            launch(**args, out=out)
        else:
            launch(**args, out=out, **{state_name: state})

    return start


@dataclass(frozen=True)
class ScanPlan:
    args: tuple | None  # the kernel's view of each operand; None: arranged per call
    names: tuple[str, ...]  # the kernel's name of each operand
    outputs: tuple  # (Allocation, the kernel's View of it) for y, then the state when the op returns one
    reason: str | None  # why the kernel cannot take operands of this signature
    spec: object  # of the forward kernel
    launch: Launch | None


class PlannedScan:
    """Mixed into a scan's FusedOp, which has `layout` (operands, out, state), `out_target`,
    `state_target`, `_arguments(tensors)` (the kernel's operands by name), `_allocate(result, target,
    device)` and `kernel_for(spec)`."""

    def _planned(self, tensors, reason_of, spec_of, *extra) -> ScanPlan:
        """The plan of these operands' signature: the kernel's views of the operands and of the outputs,
        `reason_of(args, *output views)`, the spec `spec_of()` and the launch of its kernel; `extra`:
        what else the key holds."""
        key = self.plan_key(tensors, *extra)
        plan = self._plans.get(key, NO_PLAN_YET)
        if plan is NO_PLAN_YET:
            plan = self._plans.remember(key, self._plan(tensors, reason_of, spec_of))
        return plan

    def _plan(self, tensors, reason_of, spec_of) -> ScanPlan:
        args = self._arguments(tensors)
        names = tuple(operand.name for operand in self.layout.operands)
        device = tensors[0].device
        results = [(self.layout.out, self.out_target)] + ([(self.layout.state, self.state_target)]
                                                           if self.layout.state is not None else [])
        allocated = [self._allocate(result, target, device) for result, target in results]
        reason = self.why_not_kernel(list(tensors)) or reason_of(args, *(view for _, view in allocated))
        spec = spec_of()
        return ScanPlan(views_between(tensors, [args[name] for name in names]), names,
                        tuple((Allocation.like(tensor), View.between(tensor, view)) for tensor, view in allocated),
                        reason, spec, None if reason else Launch(*self.kernel_for(spec)))

    def _planned_arguments(self, plan: ScanPlan, tensors) -> dict[str, torch.Tensor]:
        if plan.args is None:
            return self._arguments(tensors)
        return self._completed({name: view.of(tensor) for name, view, tensor in zip(plan.names, plan.args, tensors)},
                               tensors[0].device)

    def _completed(self, args: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        """The kernel's operands by name from those the graph passes (a family adds what it lacks)."""
        return args

    @staticmethod
    def _planned_outputs(plan: ScanPlan, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, the kernel's view of it) for y, then the state if the op returns one."""
        outputs = []
        for allocation, view in plan.outputs:
            tensor = allocation.new(device)
            outputs.append((tensor, view.of(tensor)))
        return outputs

    def _fast_path(self, plan: ScanPlan | None, start):
        """fast_path's function for `plan`: the planned operand views and output allocations, then
        start(bound launch, kernel operands by name, the kernel's views of the outputs)."""
        if (plan is None or plan.reason is not None or plan.args is None
                or not isinstance(plan.launch.bound, Bound)):
            return None
        names, outputs, bound, completed = plan.names, plan.outputs, plan.launch.bound, self._completed
        viewed = [(index, name, view) for index, (name, view) in enumerate(zip(names, plan.args))
                  if view is not IDENTITY]

        def run(*tensors):
            args = dict(zip(names, tensors))
            for index, name, view in viewed:
                args[name] = view.of(tensors[index])
            device = tensors[0].device
            made = tuple(allocation.fresh(device) for allocation, _ in outputs)
            start(bound, completed(args, device), *[view.of(tensor) for tensor, (_, view) in zip(made, outputs)])
            return made if len(made) > 1 else made[0]

        return FastCall(run)

"""Random small programs for the differential fuzzer: the spellings the canonicaliser rewrites mixed
with in-place writes at random points.

A program is a list of steps. Each step is one statement template over the program's tensors,
all of shape (2, 3, 4): a `value` step makes a new tensor `v<i>` from existing ones (cat with
zeros, a stack of slices, a filled buffer, a written-out softmax, einsums of 2 and 3 operands, segment
sums, a repeat spelled with expand, baddbmm, attention,
SDPA, casts, views, masks, scales), a `write` step writes one in place (copy_, add_, setitem into
it or a view of it, fill_, zero_, index_put_, scatter_, relu_, +=, masked_fill_, div_). The
inputs x0, x1, x2 are tensors too, so writes reach the caller. `source(steps)` is the forward's
Python text, readable in a failure message and pasteable into a regression test.
"""
from __future__ import annotations

from dataclasses import dataclass

SHAPE = (2, 3, 4)
INPUTS = ("x0", "x1", "x2")

VALUES = {  # template over {a}, {b}, {c}: the expression of a new (2, 3, 4) tensor
    "scale": "{a} * 0.5 + {b} / 4.0",
    "cat_zeros": "torch.cat([torch.zeros_like({a})[..., :2], {a}], dim=-1)[..., 1:5]",
    "cat_new_zeros": "torch.cat([{a}, {a}.new_zeros(2, 3, 1)], dim=-1)[..., 1:]",
    "stack_slices": "torch.stack([{a}[:, :, i] * 2 for i in range(4)], dim=-1)",
    "where_zero": "torch.where({a} > {b}, {a}, 0.0)",
    "where_zeros_like": "torch.where({a} > {b}, torch.zeros_like({a}), {a})",
    "where_zero_row": "torch.where({b} > 0, {a}, {a}.new_zeros(4))",
    "where_tensor_zero": "torch.where({a} > {b}, {a}, torch.tensor(0.0))",
    "masked_fill": "{a}.masked_fill({b} > 0, -1.0)",
    "cast": "({a}.double() * 3).float()",
    "view": "{a}.view(2, 12).view(2, 3, 4) + {a}[:, None].squeeze(1)",
    "transpose": "{a}.transpose(1, 2).contiguous().transpose(1, 2) - {b}",
    "softmax_written": "torch.exp({a} - {a}.amax(-1, keepdim=True)) / torch.exp({a} - {a}.amax(-1, keepdim=True)).sum(-1, keepdim=True)",
    "einsum": "torch.einsum('bij,bkj->bik', {a}, {b}) @ {c}",
    "einsum3": "torch.einsum('bij,bkj,bkl->bil', {a}, {b}, {c})",
    "segsum": "(torch.cumsum(({a} * 0.1)[..., None].expand(2, 3, 4, 4).masked_fill(~torch.ones(4, 4, dtype=torch.bool)"
              ".tril(-1), 0), dim=-2).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), -torch.inf).exp() "
              "@ {b}[..., None])[..., 0]",
    "repeat_expand": "{a}[:, :1, None].expand(2, 1, 3, 4).contiguous().reshape(2, 3, 4) * {b}",
    "baddbmm": "torch.baddbmm({a}, {b}[:, :, :3], {c}, beta=0.5, alpha=2.0)",
    "attention": "(torch.softmax({a}[None] @ {b}[None].transpose(-2, -1) * 0.5, dim=-1) @ {c}[None])[0]",
    "sdpa": "F.scaled_dot_product_attention({a}[None], {b}[None], {c}[None], is_causal=True)[0]",
    "clone": "{a}.clone()",
}
BLOCKS = {  # multi-line values: {out} is the new tensor's name
    "filled": "{out} = torch.empty(2, 3, 4)\nfor i in range(4):\n    {out}[:, :, i] = {a}[:, :, i] + 1.0",
    "zeros_copy": "{out} = torch.zeros(2, 3, 4)\n{out}.copy_({a})",
    "where_written_zeros": "{out} = torch.zeros_like({a})\n{out}.add_({b})\n{out} = torch.where({a} > 0, {a}, {out})",
    "in_place_scores": "{out} = {a} @ {b}.transpose(-2, -1)\n{out}.div_(2.0)\n{out}.masked_fill_({out} > 1.0, -1e9)\n"
                       "{out} = torch.softmax({out}, dim=-1) @ {c}",
}
WRITES = {  # template writing {a} in place
    "copy_": "{a}.copy_({b})",
    "add_": "{a}.add_({b})",
    "mul_": "{a}.mul_(2.0)",
    "div_": "{a}.div_(4.0)",
    "zero_": "{a}.zero_()",
    "fill_": "{a}.fill_(0.5)",
    "setitem": "{a}[:, 0] = {b}[:, 1]",
    "view_write": "{a}[:, 1:].add_(1.0)",
    "view_fill": "{a}.view(2, 12)[:, :5].fill_(-2.0)",
    "iadd": "{a} += {b}",
    "relu_": "torch.relu_({a})",
    "masked_fill_": "{a}.masked_fill_({b} > 0, 3.0)",
    "index_put_": "{a}.index_put_((torch.tensor([1, 0]),), {b}[0])",
    "scatter_": "{a}.scatter_(2, torch.zeros(2, 3, 4, dtype=torch.long), {b})",
}
FUSING = ("attention", "sdpa", "in_place_scores")  # values with a fusible family inside


@dataclass(frozen=True)
class Step:
    kind: str  # a key of VALUES, BLOCKS or WRITES
    operands: tuple[int, int, int]  # picks among the tensors that exist when the step runs


def source(steps: list[Step]) -> str:
    """The forward's text: def forward(x0, x1, x2): ... return (every tensor)."""
    names, lines = list(INPUTS), []
    for step in steps:
        a, b, c = (names[pick % len(names)] for pick in step.operands)
        if step.kind in WRITES:
            lines.append(WRITES[step.kind].format(a=a, b=b, c=c))
            continue
        out = f"v{len(names)}"
        if step.kind in BLOCKS:
            lines.extend(BLOCKS[step.kind].format(out=out, a=a, b=b, c=c).split("\n"))
        else:
            lines.append(f"{out} = {VALUES[step.kind].format(a=a, b=b, c=c)}")
        names.append(out)
    body = "\n".join(f"    {line}" for line in lines)
    return f"def forward(x0, x1, x2):\n{body}\n    return ({', '.join(names)},)\n"


def build(steps: list[Step]):
    """The forward function `source(steps)` defines."""
    import torch
    import torch.nn.functional as F

    namespace = {"torch": torch, "F": F}
    exec(compile(source(steps), "<fuzzed program>", "exec"), namespace)
    return namespace["forward"]

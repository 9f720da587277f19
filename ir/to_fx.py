"""Lower the IR back to a torch.fx GraphModule.

Nodes imported from fx are written back with their original call; nodes created by
rewrites are written from LOWERINGS (canonical op -> torch function); fused nodes carry the
runtime op compiler.lower built from their spec in `attrs["module"]` and become a call of its
custom op, `op.custom_op([inputs], op.key)` (runtime.library), followed where needed by `op.graph_output()`,
which drops the residuals an op captured for training returns for its backward and rebuilds what the
replaced node returned. The GraphModule keeps the ops alive in its `flashfx_ops` attribute.
"""
from __future__ import annotations

import torch
import torch.fx

from ir.graph import Call, Graph, Node, Ref, map_refs


def _slice(x: torch.Tensor, dim: int, start: int, stop: int, step: int) -> torch.Tensor:
    """x[..., start:stop:step] along `dim` (a view, as the indexing it stands for)."""
    return x[(slice(None),) * dim + (slice(start, stop, step),)]


def _repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:
    return torch.repeat_interleave(x, repeats, dim=1)


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """S[..., i, j] = x[..., j+1] + ... + x[..., i] for j <= i, -inf above the diagonal (ir op segsum),
    summed as Hugging Face's segment_sum does: a cumsum of the masked columns, no differences."""
    size = x.shape[-1]
    columns = x[..., None].expand(*x.shape, size)
    ones = torch.ones(size, size, dtype=torch.bool, device=x.device)
    sums = torch.cumsum(columns.masked_fill(~ones.tril(-1), 0), dim=-2)
    return sums.masked_fill(~ones.tril(0), -torch.inf)


def _where_args(node: Node) -> tuple:
    """(condition, then, else): each branch its scalar attr, or the next tensor input."""
    tensors = iter(Ref(i) for i in range(1, len(node.inputs)))
    return (Ref(0), *(next(tensors) if node.attrs[key] is None else node.attrs[key]
                      for key in ("then_scalar", "else_scalar")))


def _second_factor(node: Node):
    """A mul's second tensor input, or its scalar."""
    return Ref(1) if len(node.inputs) == 2 else node.attrs["scalar"]


def _transform(function):
    """A torch.fft transform from its attrs (n, dim, norm)."""
    return lambda node: Call("call_function", function, (Ref(0),),
                             {key: node.attrs[key] for key in ("n", "dim", "norm")})


LOWERINGS = {
    "matmul": lambda node: Call("call_function", torch.matmul, (Ref(0), Ref(1))),
    "permute": lambda node: Call("call_function", torch.permute, (Ref(0), node.attrs["perm"])),
    "reshape": lambda node: Call("call_function", torch.reshape, (Ref(0), node.attrs["shape"])),
    "expand": lambda node: Call("call_function", torch.broadcast_to, (Ref(0), node.attrs["shape"])),
    "cast": lambda node: Call("call_method", "to", (Ref(0), node.attrs["dtype"])),
    "repeat_interleave": lambda node: Call("call_function", torch.repeat_interleave, (Ref(0), node.attrs["repeats"]),
                                           {"dim": node.attrs["dim"]}),
    "repeat_kv": lambda node: Call("call_function", _repeat_kv, (Ref(0), node.attrs["repeats"])),
    "add": lambda node: Call("call_function", torch.add, (Ref(0), Ref(1))),
    "mul": lambda node: Call("call_function", torch.mul, (Ref(0), _second_factor(node))),
    "pad": lambda node: Call("call_function", torch.nn.functional.pad, (Ref(0), node.attrs["pad"]),
                             {"mode": node.attrs["mode"], "value": node.attrs["value"]}),
    "relu": lambda node: Call("call_function", torch.relu, (Ref(0),)),
    "silu": lambda node: Call("call_function", torch.nn.functional.silu, (Ref(0),)),
    "softmax": lambda node: Call("call_function", torch.softmax, (Ref(0), node.attrs["dim"])),
    "where": lambda node: Call("call_function", torch.where, _where_args(node)),
    "index": lambda node: Call("call_function", torch.index_select, (Ref(0), node.attrs["dim"], Ref(1))),
    "select": lambda node: Call("call_function", torch.select, (Ref(0), node.attrs["dim"], node.attrs["index"])),
    "slice": lambda node: Call("call_function", _slice, (Ref(0), node.attrs["dim"], node.attrs["start"],
                                                          node.attrs["stop"], node.attrs["step"])),
    "irfft": _transform(torch.fft.irfft),
    "ifft": _transform(torch.fft.ifft),
    "real": lambda node: Call("call_function", torch.real, (Ref(0),)),
    "einsum": lambda node: Call("call_function", torch.einsum,
                                (node.attrs["equation"], *[Ref(i) for i in range(len(node.inputs))])),
    "segsum": lambda node: Call("call_function", segment_sum, (Ref(0),)),
    "stack": lambda node: Call("call_function", torch.stack, ([Ref(i) for i in range(len(node.inputs))],),
                               {"dim": node.attrs["dim"]}),
}


def to_fx(graph: Graph) -> torch.fx.GraphModule:
    root = graph.owner if graph.owner is not None else torch.nn.Module()
    fx_graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for node in graph:
        env[node.name] = _emit(fx_graph, node, env)
    module = torch.fx.GraphModule(root, fx_graph)
    module.flashfx_ops = [node.attrs["module"] for node in graph if "module" in node.attrs]
    module.graph.lint()
    return module


def _call_for(node: Node) -> Call:
    if "module" in node.attrs:
        op = node.attrs["module"]
        return Call("call_function", op.custom_op, ([Ref(i) for i in range(len(node.inputs))], op.key))
    if node.call is not None:
        return node.call
    if node.op not in LOWERINGS:
        raise NotImplementedError(f"no lowering for IR op {node.op!r} ({node.name})")
    return LOWERINGS[node.op](node)


def _emit(fx_graph: torch.fx.Graph, node: Node, env) -> torch.fx.Node:
    call = _call_for(node)

    def resolve(ref: Ref) -> torch.fx.Node:
        return env[node.inputs[ref.index]]

    args, kwargs = map_refs(call.args, resolve), map_refs(call.kwargs, resolve)
    graph_output = node.attrs["module"].graph_output() if "module" in node.attrs else None
    if graph_output is not None:  # a fused op returning residuals, or MHA's (output, None)
        tensors = fx_graph.create_node(call.kind, call.target, args, kwargs, name=f"{node.name}_tensors")
        args, kwargs, call = (tensors,), {}, Call("call_function", graph_output, ())
    fx_node = fx_graph.create_node(call.kind, call.target, args, kwargs, name=node.name)
    if node.value is not None:
        fx_node.meta["example_value"] = node.value
    if node.fx_node is not None:
        fx_node.meta.update({k: v for k, v in node.fx_node.meta.items() if k != "example_value"})
    return fx_node

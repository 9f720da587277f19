"""In-place writes in a captured fx graph, and reading them as new versions of the tensor.

A call writes a tensor argument when PyTorch's schema marks it written (`Tensor(a!)`: `x.copy_(y)`,
`x.add_(y)`, `index_put_`, `scatter_`, `fill_`, `zero_`, `torch.relu_`, `out=`), when it is a
`setitem` or an augmented assignment (`x += y`), or when it is called with `inplace=True`; a
method or function named `name_` that has no schema counts as writing its first argument.
Tensors that share a storage (views, `x[:, :2]`, `x.view(...)`) see each other's writes: the
fake tensors TorchDynamo records share storages exactly where the real ones do.

functionalise(graph) makes every read after a write read the tensor's new version:

    for node in graph, in order:
        for each argument t that a write changed since t was made:
            node reads the last such write when that call returns t itself (x.copy_(y) returns x;
            setitem becomes assign(x, index, value), which returns x),
            else read_after_write(t, *writes)      # returns t; names the writes it comes after
        a write to a tensor is a write to every tensor that shares its storage

So no IR node reads a tensor across a write to it: a rewrite that looks through a tensor's
producer sees the write (an opaque call) instead of, say, the zeros it was created as.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Iterator

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

AUGMENTED = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
             operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
             operator.imatmul)


def read_after_write(tensor, *writes):
    """`tensor` after `writes` changed it in place: the same tensor, named as its new version."""
    return tensor


def assign(tensor: torch.Tensor, index, value) -> torch.Tensor:
    """`tensor[index] = value`, returning `tensor` (setitem as a call that returns what it wrote)."""
    tensor[index] = value
    return tensor


# -- which arguments a call writes ------------------------------------------------------
def writes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensor nodes among `node`'s arguments that the call writes in place."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return []
    written = _written_arguments(node)
    return [arg for arg in _flatten_nodes(written) if _is_tensor_node(arg)]


def _written_arguments(node: torch.fx.Node) -> list:
    target, args, kwargs = node.target, node.args, node.kwargs
    written = [kwargs["out"]] if kwargs.get("out") is not None else []
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(target) if node.graph.owning_module else None
        return written + ([args[0]] if args and getattr(module, "inplace", False) else [])
    if target in (operator.setitem, assign) or target in AUGMENTED or target == "__setitem__":
        return written + list(args[:1])
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    written_names = _schema_writes(target, name)
    if written_names is None:
        written_names = {"self"} if name.endswith("_") and not name.endswith("__") else set()
    if "self" in written_names and args:
        written.append(args[0])
    written += [kwargs[name] for name in written_names - {"self", "out"} if kwargs.get(name) is not None]
    if _inplace_flag(target, args, kwargs):
        written.append(args[0])
    return written


def _schema_writes(target, name: str) -> set[str] | None:
    """Names of the arguments any schema of this op marks written; None when no schema is known."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    return _aten_writes(name) if name else None


@functools.lru_cache(maxsize=None)
def _aten_writes(name: str) -> set[str] | None:
    try:
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
    except RuntimeError:
        return None
    if not schemas:
        return None
    return {arg.name for schema in schemas for arg in schema.arguments
            if arg.alias_info is not None and arg.alias_info.is_write}


def _inplace_flag(target, args: tuple, kwargs: dict) -> bool:
    """Is a Python function (F.relu, F.dropout, ...) called with inplace=True?"""
    if kwargs.get("inplace") is True:
        return True
    signature = _signature(target)
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


@functools.lru_cache(maxsize=None)
def _signature(target) -> inspect.Signature | None:
    if not callable(target) or isinstance(target, str):
        return None
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


# -- storages ---------------------------------------------------------------------------
def storages(value) -> set:
    """The storages a (fake) tensor, or a tuple or list of them, lives in."""
    keys = set()
    for tensor in _flatten_tensors(value):
        try:
            keys.add(StorageWeakRef(tensor.untyped_storage()))
        except (RuntimeError, NotImplementedError, TypeError):
            keys.add(("unknown", id(tensor)))
    return keys


def _flatten_tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten_tensors(item)


def _flatten_nodes(value) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten_nodes(item)
    else:
        yield value


def _value(node) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _is_tensor_node(arg) -> bool:
    return isinstance(arg, torch.fx.Node) and isinstance(_value(arg), torch.Tensor)


def _holds_tensors(value) -> bool:
    return any(True for _ in _flatten_tensors(value))


# -- functionalisation ------------------------------------------------------------------
class _Versions:
    """The writes to each tensor (by its fake value's identity) in graph order, which tensors share
    each storage, and where each node was made."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.made: dict[torch.fx.Node, float] = {}
        self.writes_to: dict[int, list[torch.fx.Node]] = {}
        self.members: dict[Any, set[int]] = {}  # storage -> identities of the tensors in it
        self.versions: dict[tuple, torch.fx.Node] = {}

    def register(self, node: torch.fx.Node, position: float) -> None:
        self.made[node] = position
        value = _value(node)
        if _holds_tensors(value):
            for key in storages(value):
                self.members.setdefault(key, set()).add(id(value))

    def read(self, arg: torch.fx.Node, reader: torch.fx.Node, position: float) -> torch.fx.Node:
        """The node `reader` reads for `arg`: arg itself unless something wrote it since it was made;
        then the last write when that returns this very tensor, else a new version naming the writes."""
        value = _value(arg)
        since = [write for write in self.writes_to.get(id(value), ()) if self.made[write] > self.made[arg]]
        if not since:
            return arg
        if _value(since[-1]) is value:
            return since[-1]
        key = (arg, since[-1])
        if key not in self.versions:
            with self.graph.inserting_before(reader):
                version = self.graph.call_function(read_after_write, (arg, *since))
            version.meta["example_value"] = value
            self.made[version] = position - 0.5
            self.versions[key] = version
        return self.versions[key]

    def wrote(self, node: torch.fx.Node, written: torch.fx.Node) -> None:
        for key in storages(_value(written)):
            for member in self.members.get(key, ()):
                if node not in self.writes_to.setdefault(member, []):
                    self.writes_to[member].append(node)


def functionalise(graph: torch.fx.Graph) -> None:
    """Reroute every read after an in-place write to the written tensor's new version (see the
    module docstring); setitem becomes `assign`, which returns the tensor it wrote."""
    versions = _Versions(graph)
    for position, node in enumerate(list(graph.nodes)):
        for arg in node.all_input_nodes:
            latest = versions.read(arg, node, position)
            if latest is not arg:
                node.replace_input_with(arg, latest)
        if node.op == "call_function" and node.target is operator.setitem:
            node = _as_assign(graph, node)
        versions.register(node, position)
        for written in writes(node):
            versions.wrote(node, written)


def seen_through_alias(write: torch.fx.Node) -> bool:
    """Does a tensor sharing storage with what `write` wrote (a view, the view's base) read the
    write after it? (Only after functionalise.)"""
    return any(user.target is read_after_write for user in write.users)


def _as_assign(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    with graph.inserting_before(node):
        call = graph.call_function(assign, node.args, node.kwargs)
    call.meta.update(node.meta)
    call.meta["example_value"] = _value(node.args[0])
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call

"""The many ways PyTorch code spells one operation, mapped to one canonical IR op.

Each normaliser reads an fx call and returns `(op, attrs, tensor_inputs)` or None when the
call is not in canonical form (it then stays an opaque "torch" op). TorchDynamo records
functions (`torch.matmul`), operators (`operator.matmul`, i.e. `@`) and tensor methods
(`x.matmul`) as different fx targets; this table folds them together.

    matmul      a @ b, torch.matmul, torch.bmm, x.matmul, x.bmm
    einsum      torch.einsum(equation, *operands)        (rewritten later to matmul)
    permute     transpose, swapaxes, permute, .t(), .mT
    reshape     view, reshape, flatten, unflatten, squeeze, unsqueeze, x[None, :, ...]
    expand      expand, expand_as, broadcast_to
    identity    contiguous, clone, detach, .to(same dtype and device); attrs["alias"] is True
                when the result is the input itself (safe to rewire readers to the input)
    cast        .float(), .half(), .bfloat16(), .double(), .to(dtype), .type(dtype)
    softmax     F.softmax, torch.softmax, x.softmax (optional dtype)
    mul/div/add/sub  operators, torch functions and methods, one operand may be a scalar
    where       torch.where(c, a, b), x.masked_fill(m, v) == where(m, v, x)
    dropout     F.dropout, torch.dropout, nn.Dropout (inlined)
    sdpa        F.scaled_dot_product_attention
    repeat_interleave  torch.repeat_interleave(x, n, dim)
"""
from __future__ import annotations

import operator
from numbers import Number
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F

Normalised = tuple[str, dict, list]


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _value(arg):
    return arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else arg


def _rank(arg) -> int:
    return _value(arg).dim()


def _dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _out_shape(node: torch.fx.Node) -> tuple:
    return tuple(_value(node).shape)


def _is_tensor_node(arg) -> bool:
    return isinstance(arg, torch.fx.Node) and isinstance(_value(arg), torch.Tensor)


# -- normalisers ---------------------------------------------------------------------
def matmul(node) -> Normalised:
    return "matmul", {}, [node.args[0], node.args[1]]


def einsum(node) -> Normalised | None:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not all(_is_tensor_node(o) for o in operands):
        return None
    return "einsum", {"equation": equation.replace(" ", "")}, list(operands)


def transpose(node) -> Normalised:
    x = node.args[0]
    rank = _rank(x)
    a, b = _dim(_arg(node, 1, "dim0"), rank), _dim(_arg(node, 2, "dim1"), rank)
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return "permute", {"perm": tuple(perm)}, [x]


def matrix_transpose(node) -> Normalised:
    x = node.args[0]
    rank = _rank(x)
    perm = list(range(rank))
    if rank >= 2:
        perm[-1], perm[-2] = perm[-2], perm[-1]
    return "permute", {"perm": tuple(perm)}, [x]


def permute(node) -> Normalised:
    x, *dims = node.args
    dims = node.kwargs.get("dims", dims)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    rank = _rank(x)
    return "permute", {"perm": tuple(_dim(d, rank) for d in dims)}, [x]


def reshape_like(node) -> Normalised | None:
    if not _is_tensor_node(node.args[0]):
        return None
    return "reshape", {"shape": _out_shape(node)}, [node.args[0]]


def expand(node) -> Normalised:
    return "expand", {"shape": _out_shape(node)}, [node.args[0]]


def getitem(node) -> Normalised | None:
    """x[None, :, ...] only adds unit dims: a reshape. Anything else stays opaque."""
    x, index = node.args
    if not _is_tensor_node(x):
        return None
    index = index if isinstance(index, tuple) else (index,)
    full = slice(None, None, None)
    if all(i is None or i is Ellipsis or i == full for i in index):
        return "reshape", {"shape": _out_shape(node)}, [x]
    return None


def identity(node) -> Normalised | None:
    x = node.args[0]
    if not _is_tensor_node(x):
        return None
    if node.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
        return None
    return "identity", {"alias": node.target in ("detach", torch.detach)}, [x]


def cast(node) -> Normalised | None:
    """Any .to/.type/.float... whose result only changes dtype (or nothing at all)."""
    x = node.args[0]
    if not _is_tensor_node(x) or not _is_tensor_node(node):
        return None
    source, result = _value(x), _value(node)
    if source.device != result.device or node.kwargs.get("memory_format") is not None:
        return None
    if source.dtype == result.dtype:
        return "identity", {"alias": not node.kwargs.get("copy", False)}, [x]
    return "cast", {"dtype": result.dtype}, [x]


def softmax(node) -> Normalised | None:
    x = node.args[0]
    dim = _arg(node, 1, "dim")
    if dim is None:
        return None
    dtype = node.kwargs.get("dtype")
    if dtype is None and len(node.args) > 2 and isinstance(node.args[2], torch.dtype):
        dtype = node.args[2]
    return "softmax", {"dim": _dim(dim, _rank(x)), "dtype": dtype}, [x]


def _binary(op: str) -> Callable:
    def normalise(node) -> Normalised | None:
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = node.args[0], _arg(node, 1, "other")
        tensors = [x for x in (a, b) if _is_tensor_node(x)]
        scalars = [x for x in (a, b) if isinstance(x, Number) and not isinstance(x, bool)]
        if len(tensors) + len(scalars) != 2 or not tensors:
            return None
        attrs = {"scalar": scalars[0] if scalars else None, "scalar_first": bool(scalars) and a is scalars[0]}
        return op, attrs, tensors

    return normalise


def _where_branch(value, tensors: list):
    if _is_tensor_node(value):
        tensors.append(value)
        return None
    return value


def where(node) -> Normalised | None:
    if len(node.args) != 3 or not _is_tensor_node(node.args[0]):
        return None
    condition, then, other = node.args
    tensors = [condition]
    attrs = {"then_scalar": _where_branch(then, tensors), "else_scalar": _where_branch(other, tensors)}
    return "where", attrs, tensors


def masked_fill(node) -> Normalised | None:
    x, mask, value = node.args[0], _arg(node, 1, "mask"), _arg(node, 2, "value")
    if not (_is_tensor_node(x) and _is_tensor_node(mask)):
        return None
    tensors = [mask]
    attrs = {"then_scalar": _where_branch(value, tensors), "else_scalar": None}
    tensors.append(x)
    return "where", attrs, tensors


def dropout(node) -> Normalised:
    training_default = node.target is not torch.dropout
    p = _arg(node, 1, "p", 0.5)
    training = _arg(node, 2, "train" if node.target is torch.dropout else "training", training_default)
    return "dropout", {"p": p, "training": bool(training)}, [node.args[0]]


def sdpa(node) -> Normalised:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    attrs = {
        "dropout_p": _arg(node, 4, "dropout_p", 0.0),
        "is_causal": bool(_arg(node, 5, "is_causal", False)),
        "scale": _arg(node, 6, "scale"),
        "enable_gqa": bool(_arg(node, 7, "enable_gqa", False)),
        "has_mask": mask is not None,
    }
    return "sdpa", attrs, [q, k, v] + ([mask] if mask is not None else [])


def repeat_interleave(node) -> Normalised | None:
    x, repeats, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
    if not isinstance(repeats, int) or dim is None:
        return None
    return "repeat_interleave", {"repeats": repeats, "dim": _dim(dim, _rank(x))}, [x]


FUNCTIONS: dict[Callable, Callable] = {
    operator.matmul: matmul, torch.matmul: matmul, torch.bmm: matmul,
    torch.einsum: einsum,
    torch.transpose: transpose, torch.swapaxes: transpose, torch.permute: permute,
    torch.reshape: reshape_like, torch.flatten: reshape_like, torch.squeeze: reshape_like,
    torch.unsqueeze: reshape_like, torch.unflatten: reshape_like,
    torch.broadcast_to: expand,
    operator.getitem: getitem,
    torch.clone: identity, torch.detach: identity,
    F.softmax: softmax, torch.softmax: softmax, torch.special.softmax: softmax,
    operator.mul: _binary("mul"), torch.mul: _binary("mul"),
    operator.truediv: _binary("div"), torch.div: _binary("div"), torch.true_divide: _binary("div"),
    operator.add: _binary("add"), torch.add: _binary("add"),
    operator.sub: _binary("sub"), torch.sub: _binary("sub"),
    torch.where: where, torch.masked_fill: masked_fill,
    F.dropout: dropout, torch.dropout: dropout,
    F.scaled_dot_product_attention: sdpa,
    torch.repeat_interleave: repeat_interleave,
}

METHODS: dict[str, Callable] = {
    "matmul": matmul, "bmm": matmul, "__matmul__": matmul,
    "transpose": transpose, "swapaxes": transpose, "permute": permute, "t": matrix_transpose,
    "view": reshape_like, "reshape": reshape_like, "flatten": reshape_like, "unflatten": reshape_like,
    "squeeze": reshape_like, "unsqueeze": reshape_like, "view_as": reshape_like, "reshape_as": reshape_like,
    "expand": expand, "expand_as": expand, "broadcast_to": expand,
    "contiguous": identity, "clone": identity, "detach": identity,
    "to": cast, "type": cast, "float": cast, "half": cast, "bfloat16": cast, "double": cast, "type_as": cast,
    "softmax": softmax,
    "mul": _binary("mul"), "div": _binary("div"), "add": _binary("add"), "sub": _binary("sub"),
    "masked_fill": masked_fill,
    "repeat_interleave": repeat_interleave,
}


def normalise(node: torch.fx.Node) -> Normalised | None:
    if node.op == "call_function":
        normaliser = FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        normaliser = METHODS.get(node.target)
    else:
        normaliser = None
    if normaliser is None or not _is_tensor_node(node):
        return None
    return normaliser(node)

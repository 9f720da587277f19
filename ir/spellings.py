"""The many ways PyTorch code spells one operation, mapped to one canonical IR op.

Each normaliser reads an fx call and returns `(op, attrs, tensor_inputs)` or None when the
call is not in canonical form (it then stays an opaque "torch" op). TorchDynamo records
functions (`torch.matmul`), operators (`operator.matmul`, i.e. `@`) and tensor methods
(`x.matmul`) as different fx targets; this table folds them together.

    matmul      a @ b, torch.matmul, torch.bmm, torch.mm, x.matmul, x.bmm, x.mm
    addmm       torch.addmm/baddbmm(input, a, b, beta, alpha), x.addmm/baddbmm: beta * input + alpha * a @ b
                (rewritten later to matmul, mul and add); a factor given as a 0-d tensor is None in attrs
                and an input after the matrices (beta's first)
    einsum      torch.einsum(equation, *operands); the equation made explicit: no spaces, "..." spelled
                out as letters from each operand's rank, the implicit output (indices seen once, sorted)
                written after "->" (rewritten later to matmul, or split into 2-operand products)
    permute     transpose, swapaxes, permute, .t(), .T, .mT
    reshape     view, reshape, flatten, unflatten, squeeze, unsqueeze, x[None, :, ...]
    expand      expand, expand_as, broadcast_to
    identity    contiguous, clone, detach, .to(same dtype and device); attrs["alias"] is True
                when the result is the input itself (safe to rewire readers to the input)
    cast        .float(), .half(), .bfloat16(), .double(), .to(dtype), .type(dtype)
    softmax     F.softmax, torch.softmax, x.softmax (optional dtype)
    mul/div/add/sub  operators, torch functions and methods, one operand may be a scalar; the in-place
                forms (`x /= s`, `x.mul_(s)`) too when x is a fresh result read by nothing else
    where       torch.where(c, a, b), x.masked_fill(m, v) == where(m, v, x) (x.masked_fill_ as the in-place ops)
    dropout     F.dropout, torch.dropout, nn.Dropout (inlined)
    sdpa        F.scaled_dot_product_attention
    mha         F.multi_head_attention_forward (nn.MultiheadAttention): attrs hold its flags, "roles" names
                each tensor input (query, key, value, weights and biases, masks), "unsupported" the
                features present that flashfx does not fuse
    encoder_layer  torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer's inference fast path):
                attrs num_heads, use_gelu, norm_first, eps, mask_type, "roles" as for mha
    repeat_interleave  torch.repeat_interleave(x, n, dim)
    linear      F.linear(x, w, b=None) (nn.Linear inlined); attrs["has_bias"]
    index       x[idx], x[:, idx], x[..., idx], x.index_select(d, idx), torch.index_select: an int32/int64
                tensor idx picks entries along one dim (1-D for index_select, any rank for []);
                F.embedding(idx, w) is w[idx]
    relu        F.relu, torch.relu, x.relu(), nn.ReLU (inlined), and in place (torch.relu_, x.relu_(),
                inplace=True); attrs["inplace"] only when another reader could see the old value
    gelu        F.gelu, nn.GELU (inlined); attrs["approximate"] is "none" or "tanh"
    select      x[:, i], x[..., i, :], torch.select, x.select: one Python int among full slices picks
                entry i of one dim (the dim disappears); attrs["dim"], attrs["index"] (non-negative)
    stack/cat   torch.stack, torch.cat/concat/concatenate over a list of tensors; attrs["dim"]
                (stack: a dim of the result); the tensors are the inputs, in order
    exp         torch.exp, x.exp()
    softplus    F.softplus; attrs["beta"], attrs["threshold"]
    silu        F.silu, nn.SiLU (inlined), not in place
    sum         torch.sum, x.sum(); attrs["dim"] a sorted tuple (all dims when none given),
                attrs["keepdim"], attrs["dtype"]
    cumsum      torch.cumsum, x.cumsum(); attrs["dim"] (non-negative), attrs["dtype"]
    clamp       torch.clamp/clip, x.clamp/clip with number bounds; attrs["min"], attrs["max"] (None: unbounded)
    slice       x[..., a:b], x[:, a:b:s], x.narrow(d, a, n), torch.narrow: one slice with int bounds among
                full slices; attrs["dim"], attrs["start"], attrs["stop"], attrs["step"] (clamped to the
                dim's size the way Python slicing does, stop >= start)
    rfft/irfft/fft/ifft  torch.fft.*(x, n, dim, norm); attrs["n"] the transform length (the default
                filled in), attrs["dim"], attrs["norm"] ("backward" when none given); rfftn/irfftn/
                fftn/ifftn over one dim (`s=(n,)`, `dim=(d,)`) as the one-dim transform
    real        x.real, torch.real
    conv1d      F.conv1d, torch.conv1d, nn.Conv1d (inlined); attrs["stride"], attrs["padding"] (an int,
                or "same"/"valid"), attrs["dilation"], attrs["groups"], attrs["has_bias"]
    pad         F.pad, torch.constant_pad_nd; attrs["pad"] (a tuple), attrs["mode"], attrs["value"]
    sigmoid     torch.sigmoid, F.sigmoid, x.sigmoid()
    tanh        torch.tanh, F.tanh, x.tanh(), nn.Tanh (inlined)
"""
from __future__ import annotations

import inspect
import operator
from numbers import Number
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F

from ir import mutation
from ir.match import int_index

Normalised = tuple[str, dict, list]
INDEX_DTYPES = (torch.int32, torch.int64)
IN_PLACE_AWARE: set[Callable] = set()  # normalisers that read an in-place call (see _in_place, relu)


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


def addmm(node) -> Normalised | None:
    operands = [_arg(node, 0, "input"), _arg(node, 1, "mat1", node.kwargs.get("batch1")),
                _arg(node, 2, "mat2", node.kwargs.get("batch2"))]
    factors = {key: node.kwargs.get(key, 1) for key in ("beta", "alpha")}
    if not all(_is_tensor_node(x) for x in operands) or not all(map(_is_factor, factors.values())):
        return None
    tensor_factors = [factor for factor in factors.values() if _is_tensor_node(factor)]
    return "addmm", {key: None if _is_tensor_node(f) else f for key, f in factors.items()}, operands + tensor_factors


def _is_factor(arg) -> bool:
    """A number, or a 0-d tensor (GPT-NeoX's alpha=torch.tensor(1.0) / norm_factor)."""
    return isinstance(arg, Number) or (_is_tensor_node(arg) and _rank(arg) == 0)


def einsum(node) -> Normalised | None:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not all(_is_tensor_node(o) for o in operands):
        return None
    explicit = _explicit_equation(equation.replace(" ", ""), [_rank(o) for o in operands])
    return None if explicit is None else ("einsum", {"equation": explicit}, list(operands))


def _explicit_equation(equation: str, ranks: list[int]) -> str | None:
    """The equation with "..." spelled out in letters no term uses and the output written out
    (torch's implicit output: the "..." dims, then the indices seen once, in alphabetical order);
    None when malformed."""
    inputs, arrow, out = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ranks) or not all(c.isalpha() for term in terms + [out] for c in term.replace("...", "")):
        return None
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in equation]
    widths = [rank - len(term.replace("...", "")) for term, rank in zip(terms, ranks)]
    ellipsis = "".join(spare[:max([w for term, w in zip(terms, widths) if "..." in term], default=0)])
    terms = [term.replace("...", ellipsis[len(ellipsis) - width:] if width > 0 else "") for term, width in
             zip(terms, widths)]
    if any(len(term) != rank for term, rank in zip(terms, ranks)):
        return None
    letters = "".join(terms)
    once = sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ellipsis)
    out = out.replace("...", ellipsis) if arrow else ellipsis + "".join(once)
    return f"{','.join(terms)}->{out}"


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
    """x[None, :, ...] only adds unit dims: a reshape; x[:, idx] an index. Anything else stays opaque."""
    x, index = node.args
    if not _is_tensor_node(x):
        return None
    index = index if isinstance(index, tuple) else (index,)
    full = slice(None, None, None)
    if all(i is None or i is Ellipsis or i == full for i in index):
        return "reshape", {"shape": _out_shape(node)}, [x]
    return _int_index(x, index) or _tensor_index(x, index) or _slice_index(x, index)


def _item_dim(x, index: tuple, position: int) -> int | None:
    """The dim of x that index[position] picks from, when every other item is a full slice
    and at most one is an Ellipsis; None otherwise."""
    rest = index[:position] + index[position + 1:]
    full = slice(None, None, None)
    if not all(item is Ellipsis or item == full for item in rest) or sum(item is Ellipsis for item in rest) > 1:
        return None
    after_ellipsis = any(item is Ellipsis for item in index[:position])
    return _rank(x) - (len(index) - position) if after_ellipsis else position


def _tensor_index(x, index: tuple) -> Normalised | None:
    """x[:, ..., idx, ...]: one integer tensor, full slices and at most one Ellipsis around it."""
    positions = [i for i, item in enumerate(index) if _is_tensor_node(item)]
    if len(positions) != 1 or _value(index[positions[0]]).dtype not in INDEX_DTYPES:
        return None
    dim = _item_dim(x, index, positions[0])
    return None if dim is None else ("index", {"dim": dim}, [x, index[positions[0]]])


def _int_index(x, index: tuple) -> Normalised | None:
    """x[:, ..., i, ...]: one Python int (in range), full slices and at most one Ellipsis around it."""
    picked = None if None in index else int_index(index, _value(x).shape)
    return None if picked is None else _select(x, *picked)


def _slice_index(x, index: tuple) -> Normalised | None:
    """x[:, ..., a:b:s, ...]: one slice with int (or None) bounds, full slices and at most one Ellipsis around it."""
    full = slice(None, None, None)
    positions = [i for i, item in enumerate(index) if isinstance(item, slice) and item != full]
    if len(positions) != 1:
        return None
    item = index[positions[0]]
    if not all(bound is None or (isinstance(bound, int) and not isinstance(bound, bool))
               for bound in (item.start, item.stop, item.step)):
        return None
    dim = _item_dim(x, index, positions[0])
    return None if dim is None else _slice(x, dim, item)


def _slice(x, dim: int, item: slice) -> Normalised:
    start, stop, step = item.indices(_value(x).shape[dim])
    return "slice", {"dim": dim, "start": start, "stop": max(start, stop), "step": step}, [x]


def narrow(node) -> Normalised | None:
    x, dim, start, length = node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "start"), _arg(node, 3, "length")
    if not (_is_tensor_node(x) and all(isinstance(a, int) for a in (dim, start, length))):
        return None
    dim = _dim(dim, _rank(x))
    start = start % _value(x).shape[dim] if start < 0 else start
    return _slice(x, dim, slice(start, start + length))


def _select(x, dim: int, index: int) -> Normalised:
    size = _value(x).shape[dim]
    return "select", {"dim": dim, "index": index % size if size else index}, [x]


def select(node) -> Normalised | None:
    x, dim, index = node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "index")
    if not (_is_tensor_node(x) and isinstance(dim, int) and isinstance(index, int)):
        return None
    return _select(x, _dim(dim, _rank(x)), index)


def index_select(node) -> Normalised | None:
    x, dim, idx = node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "index")
    if not (_is_tensor_node(idx) and isinstance(dim, int)) or _rank(idx) != 1 or _value(idx).dtype not in INDEX_DTYPES:
        return None
    return "index", {"dim": _dim(dim, _rank(x))}, [x, idx]


def embedding(node) -> Normalised | None:
    """F.embedding(idx, w) reads rows of w: w[idx] (padding_idx only changes gradients; max_norm, which
    renormalises w in place, stays as written)."""
    idx, weight = node.args[0], _arg(node, 1, "weight")
    if not (_is_tensor_node(idx) and _is_tensor_node(weight)) or _value(idx).dtype not in INDEX_DTYPES:
        return None
    return None if _arg(node, 3, "max_norm") is not None else ("index", {"dim": 0}, [weight, idx])


def attribute(node) -> Normalised | None:
    """x.T (all dims reversed) and x.mT (last two swapped) are permutes, x.real is real; other
    attributes stay opaque."""
    x, name = node.args
    if not _is_tensor_node(x) or name not in ("T", "mT", "real"):
        return None
    if name == "real":
        return real(node)
    if name == "mT":
        return matrix_transpose(node)
    return "permute", {"perm": tuple(reversed(range(_rank(x))))}, [x]


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


FRESH_RESULTS = {"matmul", "mul", "div", "add", "sub", "softmax", "where", "exp", "linear", "cast", "conv1d",
                 "relu", "gelu", "silu"}


def _in_place(functional: str | Callable) -> Callable:
    """`x op= y`, `x.op_(...)`: the functional op (a binary op's name, or a normaliser) when nothing
    else can observe x's old value. ir.from_fx routes later reads of x through the call first."""
    functional = _binary(functional) if isinstance(functional, str) else functional

    def normalise_in_place(node) -> Normalised | None:
        return functional(node) if _unobserved_write(node) else None

    IN_PLACE_AWARE.add(normalise_in_place)
    return normalise_in_place


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


MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
MHA_TENSORS = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
               "v_proj_weight", "out_proj_weight", "out_proj_bias", "key_padding_mask", "attn_mask")
MHA_UNSUPPORTED = ("bias_k", "bias_v", "static_k", "static_v")


def multi_head_attention(node) -> Normalised | None:
    try:
        bound = MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    arguments = bound.arguments
    roles = tuple(role for role in MHA_TENSORS if _is_tensor_node(arguments[role]))
    unsupported = [name for name in MHA_UNSUPPORTED if arguments[name] is not None]
    unsupported += ["add_zero_attn"] if arguments["add_zero_attn"] else []
    flags = ("num_heads", "dropout_p", "training", "need_weights", "is_causal", "use_separate_proj_weight")
    if not all(isinstance(arguments[name], (bool, int, float)) for name in flags):
        return None
    attrs = {name: arguments[name] for name in flags}
    attrs.update(roles=roles, unsupported=tuple(unsupported))
    return "mha", attrs, [arguments[role] for role in roles]


ENCODER_LAYER_ARGS = ("src", "embed_dim", "num_heads", "in_proj_weight", "in_proj_bias", "out_proj_weight",
                      "out_proj_bias", "use_gelu", "norm_first", "eps", "norm1_weight", "norm1_bias", "norm2_weight",
                      "norm2_bias", "linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias", "mask",
                      "mask_type")


def encoder_layer(node) -> Normalised | None:
    if node.kwargs or len(node.args) > len(ENCODER_LAYER_ARGS):
        return None
    arguments = dict(zip(ENCODER_LAYER_ARGS, node.args))
    roles = tuple(role for role in ENCODER_LAYER_ARGS if _is_tensor_node(arguments.get(role)))
    flags = ("num_heads", "use_gelu", "norm_first", "eps")
    if not all(isinstance(arguments.get(name), (bool, int, float)) for name in flags):
        return None
    attrs = {name: arguments[name] for name in flags}
    attrs.update(roles=roles, mask_type=arguments.get("mask_type"))
    return "encoder_layer", attrs, [arguments[role] for role in roles]


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


def linear(node) -> Normalised | None:
    x, weight, bias = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not _is_tensor_node(weight) or not (bias is None or _is_tensor_node(bias)):
        return None
    return "linear", {"has_bias": bias is not None}, [x, weight] + ([bias] if bias is not None else [])


def relu(node) -> Normalised:
    """attrs["inplace"] stays True only when something else can observe the input's old value."""
    in_place = bool(mutation.writes(node))
    return "relu", {"inplace": in_place and not _unobserved_write(node)}, [node.args[0]]


def _unobserved_write(node) -> bool:
    """Can `node`, which writes its first argument in place, be read as the functional op? Yes when
    that argument is a fresh result nothing else reads and no view of it reads the write."""
    return _unobserved_fresh(node.args[0]) and not mutation.seen_through_alias(node)


METADATA_READS = ("expand_as", "view_as", "reshape_as", "type_as")  # x.expand_as(y) reads y's shape only


def _unobserved_fresh(target) -> bool:
    """Is `target` a fresh result (of an op in FRESH_RESULTS, not an in-place relu another reader
    could see) whose values only the node at hand reads (others may read its shape or dtype)?"""
    if not _is_tensor_node(target):
        return False
    value_readers = [user for user in target.users if not (
        user.op == "call_method" and user.target in METADATA_READS and user.args[1:] == (target,)
        and user.args[0] is not target)]
    if len(value_readers) != 1:
        return False
    produced_by = normalise(target)
    return produced_by is not None and produced_by[0] in FRESH_RESULTS and not produced_by[1].get("inplace")


def gelu(node) -> Normalised | None:
    approximate = _arg(node, 1, "approximate", "none")
    if approximate not in ("none", "tanh"):
        return None
    return "gelu", {"approximate": approximate}, [node.args[0]]


def _joined(op: str, extra_dims: int) -> Callable:
    """stack (the result has one more dim than each tensor) and cat (the same rank)."""
    def normalise(node) -> Normalised | None:
        tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if (node.kwargs.get("out") is not None or not isinstance(tensors, (list, tuple)) or not tensors
                or not all(_is_tensor_node(t) for t in tensors) or not isinstance(dim, int)):
            return None
        return op, {"dim": _dim(dim, _rank(tensors[0]) + extra_dims)}, list(tensors)

    return normalise


def exp(node) -> Normalised | None:
    if node.kwargs.get("out") is not None or not _is_tensor_node(node.args[0]):
        return None
    return "exp", {}, [node.args[0]]


def softplus(node) -> Normalised:
    attrs = {"beta": _arg(node, 1, "beta", 1.0), "threshold": _arg(node, 2, "threshold", 20.0)}
    return "softplus", attrs, [node.args[0]]


def silu(node) -> Normalised | None:
    if _arg(node, 1, "inplace", False):
        return None
    return "silu", {}, [node.args[0]]


def reduce_sum(node) -> Normalised | None:
    x, dim = node.args[0], _arg(node, 1, "dim")
    keepdim, dtype = _arg(node, 2, "keepdim", False), node.kwargs.get("dtype")
    if node.kwargs.get("out") is not None or not _is_tensor_node(x):
        return None
    rank = _rank(x)
    if dim is None or dim == () or dim == []:
        dims = range(rank)
    else:
        dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return None
    return "sum", {"dim": tuple(sorted({_dim(d, rank) for d in dims})), "keepdim": bool(keepdim), "dtype": dtype}, [x]


def cumsum(node) -> Normalised | None:
    x, dim = node.args[0], _arg(node, 1, "dim")
    if node.kwargs.get("out") is not None or not _is_tensor_node(x) or not isinstance(dim, int):
        return None
    return "cumsum", {"dim": _dim(dim, _rank(x)), "dtype": _arg(node, 2, "dtype")}, [x]


def clamp(node) -> Normalised | None:
    """clamp/clip with number (or absent) bounds; tensor bounds stay opaque."""
    x, low, high = node.args[0], _arg(node, 1, "min"), _arg(node, 2, "max")
    bounds = [bound for bound in (low, high) if bound is not None]
    if (node.kwargs.get("out") is not None or not _is_tensor_node(x) or not bounds
            or not all(isinstance(b, Number) and not isinstance(b, bool) for b in bounds)):
        return None
    return "clamp", {"min": low, "max": high}, [x]


def _one_dim_transform(op: str, node, n, dim, norm) -> Normalised | None:
    """node, a torch.fft transform `op` of its first argument along `dim`, as the canonical op; n is
    the input's length along dim when not given (rfft), else the output's (the inverse transforms'
    default 2 (m - 1) included)."""
    x = node.args[0]
    if not (_is_tensor_node(x) and isinstance(dim, int) and (n is None or isinstance(n, int))
            and node.kwargs.get("out") is None):
        return None
    dim = _dim(dim, _rank(x))
    if n is None:
        n = _value(x).shape[dim] if op == "rfft" else _out_shape(node)[dim]
    return op, {"n": n, "dim": dim, "norm": norm or "backward"}, [x]


def _transform(op: str) -> Callable:
    """torch.fft.rfft/irfft/fft/ifft(x, n, dim, norm)."""
    def normalise(node) -> Normalised | None:
        return _one_dim_transform(op, node, _arg(node, 1, "n"), _arg(node, 2, "dim", -1), _arg(node, 3, "norm"))

    return normalise


def _transform_nd(op: str) -> Callable:
    """torch.fft.rfftn/irfftn/fftn/ifftn(x, s, dim, norm) over one dim (`s=(n,)`, `dim=(d,)` or
    `dim=d`) as the one-dim transform `op`; over several dims they stay opaque."""
    def normalise(node) -> Normalised | None:
        x, s, dim = node.args[0], _arg(node, 1, "s"), _arg(node, 2, "dim")
        dims = [dim] if isinstance(dim, int) else dim
        if dims is None and (s is not None and len(s) == 1 or s is None and _is_tensor_node(x) and _rank(x) == 1):
            dims = [-1]
        if not (isinstance(dims, (tuple, list)) and len(dims) == 1 and (s is None or len(s) == 1)):
            return None
        return _one_dim_transform(op, node, None if s is None else s[0], dims[0], _arg(node, 3, "norm"))

    return normalise


def real(node) -> Normalised | None:
    return ("real", {}, [node.args[0]]) if _is_tensor_node(node.args[0]) else None


def _single(value) -> int | None:
    """conv1d's stride/padding/dilation: an int or a 1-tuple of one."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def conv1d(node) -> Normalised | None:
    x, weight, bias = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    padding = _arg(node, 4, "padding", 0)
    attrs = {"stride": _single(_arg(node, 3, "stride", 1)),
             "padding": padding if padding in ("same", "valid") else _single(padding),
             "dilation": _single(_arg(node, 5, "dilation", 1)), "groups": _arg(node, 6, "groups", 1),
             "has_bias": bias is not None}
    if (not (_is_tensor_node(x) and _is_tensor_node(weight)) or not (bias is None or _is_tensor_node(bias))
            or None in attrs.values() or not isinstance(attrs["groups"], int)):
        return None
    return "conv1d", attrs, [x, weight] + ([bias] if bias is not None else [])


def pad(node) -> Normalised | None:
    x, widths = node.args[0], _arg(node, 1, "pad")
    mode = "constant" if node.target is torch.constant_pad_nd else _arg(node, 2, "mode", "constant")
    value = _arg(node, 2 if node.target is torch.constant_pad_nd else 3, "value")
    if not (_is_tensor_node(x) and isinstance(widths, (tuple, list)) and all(isinstance(w, int) for w in widths)):
        return None
    return "pad", {"pad": tuple(widths), "mode": mode, "value": 0.0 if value is None else value}, [x]


def _elementwise(op: str) -> Callable[[torch.fx.Node], Normalised | None]:
    """A one-tensor elementwise function with no options (sigmoid, tanh)."""
    def normalise_elementwise(node) -> Normalised | None:
        if node.kwargs.get("out") is not None or not _is_tensor_node(node.args[0]):
            return None
        return op, {}, [node.args[0]]
    return normalise_elementwise


sigmoid, tanh = _elementwise("sigmoid"), _elementwise("tanh")


FUNCTIONS: dict[Callable, Callable] = {
    operator.matmul: matmul, torch.matmul: matmul, torch.bmm: matmul, torch.mm: matmul,
    torch.addmm: addmm, torch.baddbmm: addmm,
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
    operator.imul: _in_place("mul"), operator.itruediv: _in_place("div"),
    operator.iadd: _in_place("add"), operator.isub: _in_place("sub"),
    torch.where: where, torch.masked_fill: masked_fill,
    F.dropout: dropout, torch.dropout: dropout,
    F.scaled_dot_product_attention: sdpa, F.multi_head_attention_forward: multi_head_attention,
    torch._transformer_encoder_layer_fwd: encoder_layer,
    torch.repeat_interleave: repeat_interleave,
    getattr: attribute,
    F.linear: linear,
    torch.index_select: index_select, F.embedding: embedding,
    F.relu: relu, torch.relu: relu, torch.relu_: relu,
    F.gelu: gelu,
    torch.select: select,
    torch.stack: _joined("stack", 1), torch.cat: _joined("cat", 0), torch.concat: _joined("cat", 0),
    torch.concatenate: _joined("cat", 0),
    torch.exp: exp, F.softplus: softplus, F.silu: silu, torch.sum: reduce_sum, torch.cumsum: cumsum,
    torch.clamp: clamp, torch.clip: clamp,
    torch.narrow: narrow, torch.real: real, torch.conv1d: conv1d, F.conv1d: conv1d,
    F.pad: pad, torch._C._nn.pad: pad, torch.constant_pad_nd: pad,
    torch.sigmoid: sigmoid, F.sigmoid: sigmoid, torch.tanh: tanh, F.tanh: tanh,
    **{getattr(torch.fft, op): _transform(op) for op in ("rfft", "irfft", "fft", "ifft")},
    **{getattr(torch.fft, op + "n"): _transform_nd(op) for op in ("rfft", "irfft", "fft", "ifft")},
}

TUPLE_RESULTS = {multi_head_attention}  # normalisers of calls that return a tuple of tensors
IN_PLACE_AWARE.add(relu)

METHODS: dict[str, Callable] = {
    "matmul": matmul, "bmm": matmul, "mm": matmul, "__matmul__": matmul, "addmm": addmm, "baddbmm": addmm,
    "transpose": transpose, "swapaxes": transpose, "permute": permute, "t": matrix_transpose,
    "view": reshape_like, "reshape": reshape_like, "flatten": reshape_like, "unflatten": reshape_like,
    "squeeze": reshape_like, "unsqueeze": reshape_like, "view_as": reshape_like, "reshape_as": reshape_like,
    "expand": expand, "expand_as": expand, "broadcast_to": expand,
    "contiguous": identity, "clone": identity, "detach": identity,
    "to": cast, "type": cast, "float": cast, "half": cast, "bfloat16": cast, "double": cast, "type_as": cast,
    "softmax": softmax,
    "mul": _binary("mul"), "div": _binary("div"), "add": _binary("add"), "sub": _binary("sub"),
    "mul_": _in_place("mul"), "div_": _in_place("div"), "add_": _in_place("add"), "sub_": _in_place("sub"),
    "masked_fill": masked_fill, "masked_fill_": _in_place(masked_fill),
    "repeat_interleave": repeat_interleave,
    "index_select": index_select,
    "relu": relu, "relu_": relu,
    "select": select, "exp": exp, "sum": reduce_sum, "cumsum": cumsum, "clamp": clamp, "clip": clamp,
    "narrow": narrow, "sigmoid": sigmoid, "tanh": tanh,
}


def normalise(node: torch.fx.Node) -> Normalised | None:
    if node.op == "call_function":
        normaliser = FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        normaliser = METHODS.get(node.target)
    else:
        normaliser = None
    if normaliser is None or not (_is_tensor_node(node) or normaliser in TUPLE_RESULTS):
        return None
    if normaliser not in IN_PLACE_AWARE and mutation.writes(node):
        return None  # a call that writes one of its arguments (out=, inplace=True) stays as written
    return normaliser(node)

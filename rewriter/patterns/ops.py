"""One vocabulary for the many spellings of the same tensor operation in a captured graph.

A Dynamo graph writes ``q @ k.transpose(-2, -1)`` as ``operator.matmul``, ``torch.matmul`` or the
``matmul`` method; softmax arrives as ``F.softmax``, ``torch.softmax`` or ``Tensor.softmax``; a cast
as ``.to(dtype)``, ``.float()`` or ``.type(dtype)``. Matchers should not care. :func:`op` maps a node
to an :class:`Op`: a canonical name and its arguments by name, with defaults filled in, so the
patterns read like the math they look for.

Example::

    o = op(node)
    if o is not None and o.name == "softmax":
        scores, dim = o["input"], o["dim"]
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["Op", "op", "meta", "is_tensor_node", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Op:
    """A node seen as a canonical operation: ``name`` and arguments by name."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    node: Node | None = None

    def __getitem__(self, key: str) -> Any:
        return self.args[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.args.get(key, default)


def meta(node: Any) -> Any:
    """The example value recorded on a node (a FakeTensor for tensors), or None."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value


def is_tensor_node(node: Any) -> bool:
    return isinstance(meta(node), torch.Tensor)


# Each entry: canonical name and a signature used to bind positional and keyword arguments.
# For methods, the first parameter is the tensor the method is called on.
def _sig(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def _matmul(input, other): ...
def _bmm(input, mat2): ...
def _baddbmm(input, batch1, batch2, *, beta=1, alpha=1): ...
def _einsum(equation, *operands): ...
def _softmax(input, dim=None, _stacklevel=3, dtype=None): ...
def _softmax_torch(input, dim, dtype=None): ...
def _binary(input, other, *, alpha=1): ...
def _div(input, other, *, rounding_mode=None): ...
def _masked_fill(input, mask, value): ...
def _where(condition, input, other): ...
def _dropout(input, p=0.5, training=True, inplace=False): ...
def _dropout_torch(input, p, train): ...
def _unary(input): ...
def _transpose(input, dim0, dim1): ...
def _permute(input, *dims): ...
def _repeat_interleave(input, repeats, dim=None, *, output_size=None): ...
def _expand(input, *sizes): ...
def _reshape(input, *shape): ...
def _unsqueeze(input, dim): ...
def _getitem(input, index): ...
def _to(input, *args, **kwargs): ...
def _type(input, dtype=None, non_blocking=False): ...
def _type_as(input, other): ...
def _linear(input, weight, bias=None): ...
def _addmm(input, mat1, mat2, *, beta=1, alpha=1): ...
def _sum(input, dim=None, keepdim=False, *, dtype=None): ...


_FUNCTIONS: dict[Any, tuple[str, Callable]] = {
    operator.matmul: ("matmul", _matmul),
    torch.matmul: ("matmul", _matmul),
    torch.bmm: ("matmul", _bmm),
    torch.baddbmm: ("baddbmm", _baddbmm),
    torch.einsum: ("einsum", _einsum),
    torch.functional.einsum: ("einsum", _einsum),
    F.softmax: ("softmax", _softmax),
    torch.softmax: ("softmax", _softmax_torch),
    torch.special.softmax: ("softmax", _softmax_torch),
    operator.mul: ("mul", _binary),
    torch.mul: ("mul", _binary),
    operator.truediv: ("div", _div),
    torch.div: ("div", _div),
    torch.true_divide: ("div", _div),
    operator.add: ("add", _binary),
    torch.add: ("add", _binary),
    operator.sub: ("sub", _binary),
    torch.sub: ("sub", _binary),
    operator.neg: ("neg", _unary),
    torch.neg: ("neg", _unary),
    torch.masked_fill: ("masked_fill", _masked_fill),
    torch.where: ("where", _where),
    F.dropout: ("dropout", _dropout),
    torch.dropout: ("dropout", _dropout_torch),
    torch.tanh: ("tanh", _unary),
    F.tanh: ("tanh", _unary),
    torch.transpose: ("transpose", _transpose),
    torch.swapaxes: ("transpose", _transpose),
    torch.swapdims: ("transpose", _transpose),
    torch.permute: ("permute", _permute),
    torch.repeat_interleave: ("repeat_interleave", _repeat_interleave),
    torch.reshape: ("reshape", _reshape),
    torch.unsqueeze: ("unsqueeze", _unsqueeze),
    operator.getitem: ("getitem", _getitem),
    torch._C._nn.linear: ("linear", _linear),
    F.linear: ("linear", _linear),
    torch.addmm: ("addmm", _addmm),
}

_METHODS: dict[str, tuple[str, Callable]] = {
    "matmul": ("matmul", _matmul),
    "__matmul__": ("matmul", _matmul),
    "bmm": ("matmul", _bmm),
    "baddbmm": ("baddbmm", _baddbmm),
    "softmax": ("softmax", _softmax_torch),
    "mul": ("mul", _binary),
    "__mul__": ("mul", _binary),
    "div": ("div", _div),
    "__truediv__": ("div", _div),
    "true_divide": ("div", _div),
    "add": ("add", _binary),
    "__add__": ("add", _binary),
    "sub": ("sub", _binary),
    "__sub__": ("sub", _binary),
    "neg": ("neg", _unary),
    "__neg__": ("neg", _unary),
    "masked_fill": ("masked_fill", _masked_fill),
    "tanh": ("tanh", _unary),
    "transpose": ("transpose", _transpose),
    "swapaxes": ("transpose", _transpose),
    "swapdims": ("transpose", _transpose),
    "permute": ("permute", _permute),
    "repeat_interleave": ("repeat_interleave", _repeat_interleave),
    "expand": ("expand", _expand),
    "reshape": ("reshape", _reshape),
    "view": ("reshape", _reshape),
    "unsqueeze": ("unsqueeze", _unsqueeze),
    "to": ("to", _to),
    "type": ("type", _type),
    "type_as": ("type_as", _type_as),
    "float": ("float", _unary),
    "half": ("half", _unary),
    "bfloat16": ("bfloat16", _unary),
    "double": ("double", _unary),
    "contiguous": ("contiguous", _unary),
    "t": ("t", _unary),
    "sum": ("sum", _sum),
}

_SIGNATURES: dict[Callable, inspect.Signature] = {}


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = _sig(fn)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                 "double": torch.float64}


def op(node: Any) -> Op | None:
    """Describe ``node`` as a canonical :class:`Op`, or None when it is none of the known ops.

    Casts of every spelling come back as ``Op("cast", {"input": x, "dtype": d})``; dtype-preserving
    ``.to(...)`` calls (device moves, copies) come back as ``Op("to", ...)`` and are not casts.
    ``.mT`` and ``.t()`` come back as transposes of the last two dims.
    """
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        entry = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        entry = _METHODS.get(node.target)
    else:
        return None
    if entry is None:
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
                and node.args[1] in ("mT", "T"):
            return Op("transpose", {"input": node.args[0], "dim0": -2, "dim1": -1}, node)
        return None
    name, fn = entry
    bound = _bind(fn, node.args, node.kwargs)
    if bound is None:
        return None
    if name == "einsum":
        operands = bound["operands"]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        bound["operands"] = tuple(operands)
    if name == "permute":
        dims = bound["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        bound["dims"] = tuple(dims)
    if name in ("expand", "reshape"):
        key = "sizes" if name == "expand" else "shape"
        vals = bound[key]
        if len(vals) == 1 and isinstance(vals[0], (list, tuple, torch.Size)):
            vals = tuple(vals[0])
        bound[key] = tuple(vals)
    if name == "t":
        return Op("transpose", {"input": bound["input"], "dim0": -2, "dim1": -1}, node)
    if name in _CAST_METHODS:
        return Op("cast", {"input": bound["input"], "dtype": _CAST_METHODS[name]}, node)
    if name in ("to", "type", "type_as"):
        return _cast_or_move(name, bound, node)
    return Op(name, bound, node)


def _cast_or_move(name: str, bound: dict, node: Node) -> Op:
    """``.to``/``.type``/``.type_as``: a cast when the output dtype differs, else a plain move."""
    src, out = meta(bound["input"]), meta(node)
    if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor):
        if src.device != out.device:
            return Op("to", bound, node)
        if src.dtype != out.dtype:
            return Op("cast", {"input": bound["input"], "dtype": out.dtype}, node)
        return Op("identity", {"input": bound["input"]}, node)
    return Op("to", bound, node)

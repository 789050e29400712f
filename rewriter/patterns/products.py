"""Every batched matrix product, whatever its spelling, as one einsum-like description.

``q @ k.transpose(-2, -1)``, ``torch.bmm(q, k.transpose(1, 2))``, ``torch.einsum("bhqd,bhkd->bhqk",
q, k)`` and ``torch.baddbmm(bias, q, k.mT)`` all say the same thing: contract the head dim of two
tensors and keep the rest. :func:`describe_product` names each axis with a letter, looks through
transposes, permutes and ``.contiguous()`` on the operands (so the letters refer to the tensors the
user computed, e.g. ``k`` and not ``k.transpose``) and pulls scalar multiplies on the operands out
as a scale, as in timm's ``q = q * scale``.

Example: for ``torch.matmul(q, k.transpose(-2, -1))`` with 4-D ``q`` and ``k`` it returns
``lhs=q, lhs_dims="ABmc", rhs=k, rhs_dims="ABnc", out_dims="ABmn"``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import Node

from .ops import meta, op

__all__ = ["Product", "describe_product", "strip_layout", "split_batch", "refine_shape", "ScalarFn"]

# Looks a node up as a Python float when it is a compile-time scalar (a number, or a 0-d tensor
# that does not depend on the user's inputs). Supplied by the caller, which owns the values.
ScalarFn = Callable[[object], "float | None"]


@dataclass
class Product:
    """``out[out_dims] = scale * sum over contracted letters of lhs[lhs_dims] * rhs[rhs_dims]``.

    ``bias`` (with ``bias_coeff``) is the added term of ``baddbmm``; ``stripped`` lists the
    layout-only nodes looked through on each operand.
    """

    node: Node
    lhs: Node
    rhs: Node
    lhs_dims: str
    rhs_dims: str
    out_dims: str
    scale: float = 1.0
    bias: Node | None = None
    bias_coeff: float = 1.0
    stripped: list[Node] = field(default_factory=list)
    # Shapes to view lhs / rhs / out as, after :func:`split_batch` refined merged batch axes.
    views: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def contracted(self) -> set[str]:
        return (set(self.lhs_dims) & set(self.rhs_dims)) - set(self.out_dims)

    def size(self, letter: str) -> int:
        """Size of ``letter`` in the output, or in an operand for contracted letters."""
        for node, dims in ((self.node, self.out_dims), (self.lhs, self.lhs_dims), (self.rhs, self.rhs_dims)):
            if letter in dims:
                size = meta(node).shape[dims.index(letter)]
                if size != 1 or node is not self.node:
                    return int(size)
        raise KeyError(letter)


def _matmul_dims(a_nd: int, b_nd: int) -> tuple[str, str, str] | None:
    if a_nd < 2 or b_nd < 2:
        return None
    out_nd = max(a_nd, b_nd)
    batch = string.ascii_uppercase[: out_nd - 2]
    a_batch = batch[len(batch) - (a_nd - 2):] if a_nd > 2 else ""
    b_batch = batch[len(batch) - (b_nd - 2):] if b_nd > 2 else ""
    return a_batch + "mc", b_batch + "cn", batch + "mn"


def _einsum_dims(equation: str, a_nd: int, b_nd: int) -> tuple[str, str, str] | None:
    eq = equation.replace(" ", "")
    if "->" in eq:
        inputs, out = eq.split("->")
    else:
        inputs, out = eq, None
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    free = [c for c in string.ascii_uppercase if c not in eq]
    nds = (a_nd, b_nd)
    ell_len = max((nd - (len(spec) - 3) for spec, nd in zip(parts, nds) if "..." in spec), default=0)
    expanded = []
    for spec, nd in zip(parts, nds):
        if "..." in spec:
            n = nd - (len(spec) - 3)
            spec = spec.replace("...", "".join(free[ell_len - n: ell_len]))
        expanded.append(spec)
    ell = "".join(free[:ell_len])
    if out is None:
        letters = expanded[0] + expanded[1]
        out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    else:
        out = out.replace("...", ell)
    a, b = expanded
    if len(a) != a_nd or len(b) != b_nd or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    if not set(out) <= set(a) | set(b) or len(set(out)) != len(out):
        return None
    return a, b, out


def strip_layout(node: Node, dims: str, scalar: ScalarFn) -> tuple[Node, str, float, list[Node]]:
    """Look through transposes, permutes, ``.contiguous()`` and scalar multiplies on an operand.

    Returns the underlying node, its axis letters, the product of the scalars pulled out, and the
    nodes looked through.
    """
    scale = 1.0
    seen: list[Node] = []
    while True:
        o = op(node)
        if o is None:
            break
        if o.name in ("contiguous", "identity"):
            pass
        elif o.name == "transpose":
            nd = len(dims)
            i, j = o["dim0"] % nd, o["dim1"] % nd
            lst = list(dims)
            lst[i], lst[j] = lst[j], lst[i]
            dims = "".join(lst)
        elif o.name == "permute":
            perm = [d % len(dims) for d in o["dims"]]
            if sorted(perm) != list(range(len(dims))):
                break
            lst = [""] * len(dims)
            for pos, src in enumerate(perm):
                lst[src] = dims[pos]
            dims = "".join(lst)
        elif o.name in ("mul", "div"):
            a, b = o["input"], o["other"]
            if o.name == "mul" and isinstance(b, Node) and scalar(b) is None:
                a, b = b, a
            c = scalar(b)
            if c is None or not isinstance(a, Node) or c == 0 or o.get("rounding_mode") is not None:
                break
            if meta(a) is None or tuple(meta(a).shape) != tuple(meta(node).shape):
                break
            scale *= c if o.name == "mul" else 1.0 / c
            node = a
            seen.append(o.node)
            continue
        else:
            break
        seen.append(o.node)
        node = o["input"]
    return node, dims, scale, seen


def describe_product(node: Node, scalar: ScalarFn) -> Product | None:
    """Describe ``node`` as a :class:`Product` when it is a matmul, bmm, baddbmm or 2-operand einsum."""
    o = op(node)
    if o is None or o.name not in ("matmul", "einsum", "baddbmm"):
        return None
    bias, bias_coeff, scale = None, 1.0, 1.0
    if o.name == "einsum":
        if len(o["operands"]) != 2:
            return None
        a, b = o["operands"]
    elif o.name == "baddbmm":
        a, b = o["batch1"], o["batch2"]
        alpha, beta = o["alpha"], o["beta"]
        if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
            return None
        scale = float(alpha)
        if beta != 0:
            bias, bias_coeff = o["input"], float(beta)
    else:
        a, b = o["input"], o["other"] if "other" in o.args else o["mat2"]
    ma, mb = meta(a), meta(b)
    if not isinstance(ma, torch.Tensor) or not isinstance(mb, torch.Tensor):
        return None
    if o.name == "einsum":
        dims = _einsum_dims(o["equation"], ma.dim(), mb.dim())
    else:
        dims = _matmul_dims(ma.dim(), mb.dim())
    if dims is None:
        return None
    a_dims, b_dims, out_dims = dims
    a, a_dims, sa, seen_a = strip_layout(a, a_dims, scalar)
    b, b_dims, sb, seen_b = strip_layout(b, b_dims, scalar)
    return Product(node, a, b, a_dims, b_dims, out_dims, scale * sa * sb, bias, bias_coeff,
                   seen_a + seen_b)


def _groups(merged: list[int], fine: list[int]) -> list[list[int]] | None:
    """Split ``fine`` into consecutive groups whose products are the ``merged`` sizes, or None."""
    groups, i = [], 0
    for size in merged:
        group, prod = [], 1
        while i < len(fine) and (prod < size or (not group and fine[i] == size)):
            group.append(fine[i])
            prod *= fine[i]
            i += 1
            if prod == size:
                break
        if prod != size or not group:
            return None
        groups.append(group)
    while i < len(fine) and fine[i] == 1:  # trailing size-1 axes join the last group
        groups[-1].append(1)
        i += 1
    return groups if i == len(fine) else None


def split_batch(p: Product, side: str, fine_shape: tuple[int, ...]) -> Product | None:
    """Refine merged batch axes: describe ``p`` as if ``side`` ("out", "lhs" or "rhs") had ``fine_shape``.

    For ``torch.bmm`` over (B*H, S, D) operands whose scores are viewed as (B, H, S, S) before the
    softmax, the batch letter of size B*H becomes two letters of sizes B and H in every tensor that
    has it; ``views`` records the shape each tensor must be viewed as. Only the leading (batch) axes
    may differ; the last two must be equal. Returns None when the shapes do not refine each other.
    """
    dims = {"out": p.out_dims, "lhs": p.lhs_dims, "rhs": p.rhs_dims}[side]
    node = {"out": p.node, "lhs": p.lhs, "rhs": p.rhs}[side]
    shape = tuple(int(x) for x in meta(node).shape)
    if shape[-2:] != tuple(fine_shape[-2:]) or len(fine_shape) <= len(shape):
        return None
    groups = _groups(list(shape[:-2]), list(fine_shape[:-2]))
    if groups is None:
        return None
    used = set(p.lhs_dims) | set(p.rhs_dims) | set(p.out_dims)
    fresh = (c for c in string.ascii_uppercase + string.ascii_lowercase if c not in used)
    expand: dict[str, tuple[str, list[int]]] = {}
    for letter, group in zip(dims, groups):
        if len(group) > 1:
            expand[letter] = (letter + "".join(next(fresh) for _ in group[1:]), group)

    def refine(d: str, t: Node) -> tuple[str, tuple[int, ...] | None]:
        if not any(c in expand for c in d):
            return d, None
        sh = [int(x) for x in meta(t).shape]
        new_d, new_sh = "", []
        for c, size in zip(d, sh):
            if c in expand:
                letters, group = expand[c]
                new_d += letters
                new_sh += group if size != 1 else [1] * len(group)
            else:
                new_d += c
                new_sh.append(size)
        return new_d, tuple(new_sh)

    out_d, out_v = refine(p.out_dims, p.node)
    lhs_d, lhs_v = refine(p.lhs_dims, p.lhs)
    rhs_d, rhs_v = refine(p.rhs_dims, p.rhs)
    views = {k: v for k, v in (("out", out_v), ("lhs", lhs_v), ("rhs", rhs_v)) if v is not None}
    return Product(p.node, p.lhs, p.rhs, lhs_d, rhs_d, out_d, p.scale, p.bias, p.bias_coeff, p.stripped,
                   {**p.views, **views})


def refine_shape(shape: tuple[int, ...], merged: tuple[int, ...], fine: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a tensor broadcast against ``merged`` takes when ``merged`` is viewed as ``fine``.

    E.g. an ALiBi bias of shape (B*H, 1, S) added to (B*H, S, S) scores that are then viewed as
    (B, H, S, S) becomes (B, H, 1, S). Size-1 (broadcast) axes stay size 1.
    """
    if len(shape) > len(merged):
        return None
    shape = (1,) * (len(merged) - len(shape)) + tuple(shape)
    groups = _groups(list(merged[:-2]), list(fine[:-2]))
    if groups is None:
        return None
    out: list[int] = []
    for size, whole, group in zip(shape[:-2], merged[:-2], groups):
        if size == whole:
            out += group
        elif size == 1:
            out += [1] * len(group)
        else:
            return None
    return tuple(out) + tuple(shape[-2:])

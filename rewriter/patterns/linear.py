"""Find every linear product against a weight, and group siblings that read the same input.

Spellings: ``F.linear`` / ``nn.Linear`` (``torch._C._nn.linear`` in a Dynamo graph), ``addmm`` with a
weight stored (in, out) as GPT-2's ``Conv1D`` does, and ``matmul`` / ``@`` with a 2-D parameter
(transposed or not). The weight must be a parameter: a product of two activations is not a linear
layer. Each site records where the weight lives (its state-dict name and module path), its shape and
the number of rows it saw with the example inputs (the ``M`` of the GEMM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.fx import Graph, Node

from .graph import module_path, placeholder_kind, placeholder_path
from .ops import meta, op
from .products import strip_layout

__all__ = ["LinearSite", "LinearModule", "find_linears", "linear_modules", "sibling_groups", "swap_blocker"]


@dataclass
class LinearSite:
    """``y = x @ W.T + b`` (or ``x @ W + b`` when ``weight_transposed``, W stored (in, out))."""

    node: Node
    x: Node
    weight: Node
    bias: Node | None
    weight_name: str  # state-dict name, e.g. "layers.0.mlp.up_proj.weight"
    where: str  # module path of the weight's owner, e.g. "layers.0.mlp.up_proj"
    in_features: int
    out_features: int
    rows: int  # M: rows of x seen with the example inputs
    weight_transposed: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return meta(self.weight).dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.rows, self.in_features, self.out_features


def _is_param(node, kinds) -> bool:
    return isinstance(node, Node) and node.op == "placeholder" and kinds.get(node, placeholder_kind(node)) == "parameter"


def _owner(weight: Node) -> tuple[str, str]:
    name = placeholder_path(weight)
    return name, name.rsplit(".", 1)[0] if "." in name else ""


def find_linears(graph: Graph, kinds: dict | None = None) -> list[LinearSite]:
    """Every linear product against a 2-D parameter in ``graph``."""
    kinds = kinds or {}
    sites = []
    for node in graph.nodes:
        o = op(node)
        if o is None:
            continue
        x = w = b = None
        transposed = False
        if o.name == "linear":
            x, w, b = o["input"], o["weight"], o["bias"]
        elif o.name == "addmm":
            if o["beta"] != 1 or o["alpha"] != 1:
                continue
            x, w, b = o["mat1"], o["mat2"], o["input"]
            w, dims, _, _ = strip_layout(w, "kn", lambda _: None)
            transposed = dims == "kn"
        elif o.name == "matmul":
            x, w = o["input"], o.get("other", o.get("mat2"))
            if not isinstance(w, Node) or meta(w) is None or meta(w).dim() != 2:
                continue
            w, dims, _, _ = strip_layout(w, "kn", lambda _: None)
            transposed = dims == "kn"
        else:
            continue
        if not _is_param(w, kinds) or meta(w).dim() != 2 or not isinstance(x, Node) or meta(x) is None:
            continue
        if b is not None and not _is_param(b, kinds):
            continue
        w_shape = tuple(int(s) for s in meta(w).shape)
        in_f, out_f = (w_shape[0], w_shape[1]) if transposed else (w_shape[1], w_shape[0])
        xm = meta(x)
        if xm.shape[-1] != in_f:
            continue
        name, owner = _owner(w)
        sites.append(LinearSite(node, x, w, b, name, owner or module_path(node), in_f, out_f,
                                math.prod(int(s) for s in xm.shape[:-1]), transposed))
    return sites


def sibling_groups(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Linears that read the same input tensor (Q/K/V, gate/up), two or more per group."""
    groups: dict[Node, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(s.x, []).append(s)
    return [g for g in groups.values() if len(g) > 1]


@dataclass
class LinearModule:
    """One linear module and every call of it that the captured graphs make.

    ``calls`` pairs each :class:`LinearSite` with the graph context it was found in (whatever the
    caller passed, typically a :class:`~rewriter.context.GraphContext`).
    """

    path: str
    module: Any
    calls: list[tuple[Any, LinearSite]] = field(default_factory=list)

    @property
    def main(self) -> tuple[Any, LinearSite]:
        """The call with the most rows."""
        return max(self.calls, key=lambda c: c[1].rows)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [s.shape for _, s in self.calls]

    def describe(self) -> str:
        _, s = self.main
        calls = f", {len(self.calls)} calls" if len(self.calls) > 1 else ""
        return f"M {s.rows}, K {s.in_features}, N {s.out_features}{calls}"


def linear_modules(graphs: Iterable[Any], module_of: Callable[[str], Any]) -> list[LinearModule]:
    """Linear sites of every graph (objects with ``.graph`` and ``.kinds``), grouped by module path."""
    found: dict[str, LinearModule] = {}
    for g in graphs:
        for s in find_linears(g.graph, g.kinds):
            found.setdefault(s.where, LinearModule(s.where, module_of(s.where))).calls.append((g, s))
    return list(found.values())


def swap_blocker(lin: LinearModule, new_weights: str, accepts: str) -> str | None:
    """Why ``lin``'s module cannot be swapped for an inference-only, half-precision linear, or None.

    Needs a plain ``nn.Linear`` (exactly: a subclass may compute something else) with a plain weight,
    in eval mode, called only through its own ``forward``, with bf16/fp16 weights and activations
    of the weight's dtype. ``new_weights`` and ``accepts`` word the reasons ("FP8 weights",
    "FP8 conversion takes").
    """
    m = lin.module
    weight = getattr(m, "weight", None)
    if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
        return f"weight is already a {type(weight).__name__}"
    if type(m) is not nn.Linear:
        return f"the weight belongs to a {type(m).__name__}, not an nn.Linear"
    if m.training:
        return f"the module is in training mode and {new_weights} do not train; call model.eval() first"
    for _, s in lin.calls:
        o = op(s.node)
        if o is None or o.name != "linear" or module_path(s.node) != lin.path:
            return f"the weight is also used outside nn.Linear.forward (in {module_path(s.node) or 'the top module'})"
    if m.weight.dtype not in (torch.bfloat16, torch.float16):
        return f"weights are {m.weight.dtype}; {accepts} bfloat16 or float16 weights"
    x_dtypes = {meta(s.x).dtype for _, s in lin.calls}
    if x_dtypes != {m.weight.dtype}:
        return f"activations are {', '.join(sorted(map(str, x_dtypes)))} but weights are {m.weight.dtype}"
    return None

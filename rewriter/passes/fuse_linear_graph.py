"""Linears on one input whose weights are adjacent row slices of one parameter -> one GEMM, split.

What it does: ``F.linear(x, W[a:b], B[a:b])``, ``F.linear(x, W[b:c], B[b:c])``, ... (slices by
``narrow`` or indexing, in any order in the graph) become ``F.linear(x, W[a:c], B[a:c])`` once,
and each original output becomes its columns of that product through ``torch.split``. This is
what the module pass ``fuse_linear`` sets up for sibling ``nn.Linear`` layers (Q/K/V, gate/up): it
concatenates their weights once, and this pass fuses their GEMMs in every captured graph, deciding
per shape. In training the backward of ``split`` is one ``cat`` of the output gradients, so the
weight and input gradients are one GEMM each too.

The outputs become views of a wider tensor: same values, other strides. A run of slices is left
alone, with the reason, when that could matter downstream: an output (or a view of it) that is
modified in place, returned from the graph, read by a submodule call, or read by an op that
cannot take the new layout (``view`` of a shape the strides do not allow). This is checked by
re-running the affected ops on fake tensors. Each fused GEMM is checked against the original, per
linear; a linear whose check fails keeps its own product, the others still read the fused one.

Decided by :func:`rewriter.cost.sibling_linear_estimate` for the captured shape: a measured table
decides where one exists for the device and dtype; otherwise one GEMM never costs more than its
parts.

Example (what a graph reads before and after)::

    q = linear(x, narrow(W, 0, 0, 64), narrow(B, 0, 0, 64))       # and k, v on rows 64:96, 96:128
    ->  qkv = linear(x, W, B); q, k, v = split(qkv, [64, 32, 32], -1)
"""

from __future__ import annotations

import heapq
import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.node import map_arg

from ..context import Builder, GraphContext
from ..cost import linear_table, sibling_linear_estimate
from ..patterns.graph import IN_PLACE_OPERATORS, module_path, source_location
from ..patterns.ops import meta, op
from .base import GraphPass, Rewrite

__all__ = ["FuseLinearGraph"]


@dataclass
class _Slice:
    """``F.linear(x, weight[start:stop], bias[start:stop])`` in the graph."""

    node: Node
    x: Node
    weight: Node
    bias: Node | None
    start: int
    stop: int
    weight_rows: Node  # the slicing nodes, dead once the linear is replaced
    bias_rows: Node | None

    @property
    def size(self) -> int:
        return self.stop - self.start


def _narrow(input, dim, start, length): ...


_NARROW = inspect.signature(_narrow)


def _rows(node: Any, ctx: GraphContext, ndim: int) -> tuple[Node, int, int] | None:
    """``(parameter, start, stop)`` when ``node`` is a row slice of a parameter with ``ndim`` dims:
    ``p.narrow(0, start, length)``, ``p[start:stop]`` or ``p[start:stop, :]``."""
    if not isinstance(node, Node):
        return None
    if (node.op, node.target) in (("call_method", "narrow"), ("call_function", torch.narrow)):
        try:
            bound = _NARROW.bind(*node.args, **node.kwargs).arguments
        except TypeError:
            return None
        src, dim, start, length = bound["input"], bound["dim"], bound["start"], bound["length"]
        if not all(type(v) is int for v in (dim, start, length)):
            return None
        index = slice(start, start + length) if start >= 0 else slice(start, start + length or None)
    elif node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        src, index, dim = node.args[0], node.args[1], 0
        if isinstance(index, tuple) and index and all(i == slice(None) for i in index[1:]):
            index = index[0]
    else:
        return None
    v = meta(src)
    if not (isinstance(src, Node) and src.op == "placeholder" and ctx.kinds.get(src) == "parameter"
            and isinstance(v, torch.Tensor) and v.dim() == ndim and dim in (0, -ndim)
            and isinstance(index, slice)
            and all(i is None or type(i) is int for i in (index.start, index.stop, index.step))):
        return None
    start, stop, step = index.indices(v.shape[0])
    if step != 1 or stop <= start:
        return None
    return src, start, stop


def _slices(ctx: GraphContext) -> list[_Slice]:
    found = []
    for node in ctx.graph.nodes:
        o = op(node)
        if o is None or o.name != "linear" or not isinstance(o["input"], Node):
            continue
        w = _rows(o["weight"], ctx, 2)
        if w is None:
            continue
        b = None
        if o["bias"] is not None:
            b = _rows(o["bias"], ctx, 1)
            if b is None or b[1:] != w[1:]:
                continue
        found.append(_Slice(node, o["input"], w[0], None if b is None else b[0], w[1], w[2], o["weight"],
                            None if b is None else o["bias"]))
    return found


def _runs(slices: list[_Slice]) -> list[list[_Slice]]:
    """Slices of one input, weight and bias whose rows follow each other, two or more per run."""
    groups: dict[tuple, list[_Slice]] = {}
    for s in slices:
        groups.setdefault((s.x, s.weight, s.bias), []).append(s)
    runs = []
    for group in groups.values():
        run: list[_Slice] = []
        for s in sorted(group, key=lambda s: (s.start, s.stop)):
            if run and s.start != run[-1].stop:
                if len(run) > 1:
                    runs.append(run)
                run = []
            run.append(s)
        if len(run) > 1:
            runs.append(run)
    return runs


def _describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} at {source_location(node)}"


def _in_place(node: Node) -> bool:
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    name = getattr(node.target, "__name__", "")
    return node.target in IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))


def _same_layout(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def _layout_problem(ctx: GraphContext, changed: dict[Node, Any]) -> str | None:
    """Why the graph cannot take the values in ``changed`` (fake tensors, other strides) in place of
    its nodes' own, or None. Every op reached through a changed value is re-run on fake tensors;
    ``changed`` gains the nodes whose layout changes in turn."""
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    todo = [(order[u], u) for n in changed for u in n.users]
    heapq.heapify(todo)
    done = set(changed)
    while todo:
        _, u = heapq.heappop(todo)
        if u in done:
            continue
        done.add(u)
        if u.op == "output":
            return "a fused output (or a view of it) leaves the graph (returned, or read after a graph break)"
        if u.op not in ("call_function", "call_method"):
            return f"a fused output is read by {u.op} {u.target}"
        if _in_place(u):
            return f"a fused output (or a view of it) is modified in place by {_describe(u)}"
        args, kwargs = map_arg((u.args, u.kwargs), lambda a: changed[a] if a in changed else meta(a))
        try:
            with ctx.fake_mode:
                if u.op == "call_method":
                    new = getattr(args[0], u.target)(*args[1:], **kwargs)
                else:
                    new = u.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure means the op cannot take the new layout
            return f"{_describe(u)} cannot take a fused output, a view of a wider tensor ({type(exc).__name__}: {exc})"
        if _same_layout(new, meta(u)):
            continue
        changed[u] = new
        for w in u.users:
            heapq.heappush(todo, (order[w], w))
    return None


def _location(s: _Slice) -> str:
    return module_path(s.node) or source_location(s.node)


def _where(run: list[_Slice]) -> str:
    paths = [module_path(s.node).split(".") for s in run]
    common = []
    for level in zip(*paths):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


class FuseLinearGraph(GraphPass):
    """Adjacent row slices of one weight on one input -> one ``F.linear``, outputs split."""

    name = "fuse_linear_graph"
    kind = "linear"
    description = "linears on adjacent row slices of one weight, same input -> one GEMM, outputs split"

    def run(self, ctx: GraphContext) -> None:
        table = linear_table(ctx.device_spec)
        rewrites: list[Rewrite] = []
        planned: list[tuple[list[Rewrite], dict[Node, Any]]] = []
        for run in _runs(_slices(ctx)):
            where = _where(run)
            names = ", ".join(module_path(s.node)[len(where) + 1 if where else 0:] or s.node.name for s in run)
            if not all(ctx.config.selects(module_path(s.node)) for s in run):
                self._skip_run(ctx, run, "outside Config.modules", names)
                continue
            xm = meta(run[0].x)
            rows, k = math.prod(xm.shape[:-1]), xm.shape[-1]
            sizes = [s.size for s in run]
            est, source = sibling_linear_estimate(ctx.device_spec, table, rows, k, sizes, meta(run[0].weight).dtype,
                                                  run[0].bias is not None)
            detail = f"{names}: M {rows}, K {k}, N {'+'.join(map(str, sizes))}"
            if est.speedup is not None and est.speedup <= 1.0:
                self._skip_run(ctx, run, f"the cost model predicts no gain: one GEMM {est.seconds_after * 1e3:.4g} ms "
                                         f"against {est.seconds_before * 1e3:.4g} ms for the parts ({source})", detail)
                continue
            if ctx.fake_mode is None:
                self._skip_run(ctx, run, "the graph records no fake tensors to check the outputs' new layout on",
                               detail)
                continue
            changed = dict(zip((s.node for s in run), _fake_parts(ctx, run)))
            problem = _layout_problem(ctx, changed)
            if problem:
                self._skip_run(ctx, run, problem, detail)
                continue
            mine = self._rewrites(ctx, run, detail + f" -> one GEMM of N {sum(sizes)}", est)
            rewrites += mine
            planned.append((mine, changed))
        self.commit(ctx, rewrites)
        for mine, changed in planned:
            if all(rw.site.rewritten for rw in mine):  # record the new layouts for later passes
                replaced = {rw.output for rw in mine}
                for node, value in changed.items():
                    if node not in replaced:
                        node.meta["example_value"] = value

    def _skip_run(self, ctx: GraphContext, run: list[_Slice], reason: str, detail: str) -> None:
        for s in run:
            self.skip(ctx, _location(s), reason, detail=detail)

    def _rewrites(self, ctx: GraphContext, run: list[_Slice], detail: str, est) -> list[Rewrite]:
        first = run[0]
        lo, hi = first.start, run[-1].stop
        sizes = [s.size for s in run]
        whole = lo == 0 and hi == meta(first.weight).shape[0]
        built: dict[Any, Node] = {}  # graph -> the split node built there

        def parts(b: Builder, env: dict[Node, Node]) -> Node:
            if b.graph not in built:
                w, bias = env[first.weight], None if first.bias is None else env[first.bias]
                if not whole:
                    w = b.call(torch.narrow, w, 0, lo, hi - lo)
                    bias = None if bias is None else b.call(torch.narrow, bias, 0, lo, hi - lo)
                y = b.call(F.linear, env[first.x], w, bias)
                built[b.graph] = b.call(torch.split, y, sizes, -1)
            return built[b.graph]

        saved = None if est.saved_ms is None else round(est.saved_ms / len(run), 4)
        speedup = None if est.speedup is None else round(est.speedup, 2)
        inputs = [first.x, first.weight] + ([first.bias] if first.bias is not None else [])
        out = []
        order = {n: i for i, n in enumerate(ctx.graph.nodes)}
        for i, s in sorted(enumerate(run), key=lambda p: order[p[1].node]):  # apply in graph order
            def emit(b: Builder, env: dict[Node, Node], i=i) -> Node:
                return b.call(operator.getitem, parts(b, env), i)

            site = self.site(ctx, _location(s), detail, target="fused GEMM", est_speedup=speedup,
                             est_saved_ms=saved)
            out.append(Rewrite(site, s.node, inputs, emit, random_inputs={first.x},
                               removable=[n for n in (s.weight_rows, s.bias_rows) if n is not None]))
        return out


def _fake_parts(ctx: GraphContext, run: list[_Slice]) -> tuple[torch.Tensor, ...]:
    """The fake outputs the fused GEMM's split gives (shapes, dtypes and strides of the views)."""
    lo, hi = run[0].start, run[-1].stop
    w = meta(run[0].weight)
    b = None if run[0].bias is None else meta(run[0].bias)
    with ctx.fake_mode:
        w = w.narrow(0, lo, hi - lo)
        b = None if b is None else b.narrow(0, lo, hi - lo)
        return torch.split(F.linear(meta(run[0].x), w, b), [s.size for s in run], -1)

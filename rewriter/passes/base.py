"""What every pass is: a name, a matcher, a guard, a rewrite, and a report entry for each site.

There are two stages. A :class:`ModulePass` changes modules before compilation (one-time weight
work: quantizing, pruning, packing), guided by a first capture of the model's graphs; it runs only
through :func:`rewriter.optimize`. A :class:`GraphPass` rewrites each captured graph inside the
torch.compile backend.

A graph pass works on one captured graph through a :class:`~rewriter.context.GraphContext`. It
finds sites with a matcher from :mod:`rewriter.patterns`, decides per site (config, guard, cost
model), and hands each accepted site to :meth:`GraphPass.commit` as a :class:`Rewrite`. ``commit``
validates the rewrites (when the config says so), applies the ones that pass, and reports every
site either way. A pass never imports another pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch.fx import Graph, Node

from ..context import Builder, GraphContext
from ..report import Site
from ..validate import check_rewrite

__all__ = ["Pass", "GraphPass", "ModulePass", "ModuleContext", "Rewrite"]


@dataclass
class Rewrite:
    """A replacement for the subgraph that ends at ``output``.

    ``emit(builder, env)`` adds the replacement's nodes through ``builder`` and returns the node
    that takes ``output``'s place; ``env`` maps each node of ``inputs`` to the node to read in the
    graph being built (itself in the model's graph, a placeholder when validating).
    ``random_inputs`` are the inputs validation may redraw at random (data, not masks).
    """

    site: Site
    output: Node
    inputs: list[Node]
    emit: Callable[[Builder, dict[Node, Node]], Node]
    random_inputs: set[Node] = field(default_factory=set)
    removable: list[Node] = field(default_factory=list)  # nodes that die once output is replaced


class Pass:
    """What both stages share: identity, the modes that run it, and report helpers.

    ``modes`` lists the modes in which the pass runs by default; an empty tuple makes it opt-in by
    name (``Config(enable=...)``). ``exact=False`` marks a lossy pass, never run in mode "exact".
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    modes: ClassVar[tuple[str, ...]] = ("exact", "fast", "max")
    stage: ClassVar[str] = "graph"

    def skip(self, ctx, where: str, reason: str, detail: str = "", **extra: Any) -> Site:
        return ctx.report.add(Site(self.name, self.kind, where, "skipped", detail=detail, reason=reason,
                                   graph=ctx.graph_index, **extra))

    def site(self, ctx, where: str, detail: str, **extra: Any) -> Site:
        """A site about to be rewritten (added to the report once applied)."""
        return Site(self.name, self.kind, where, "rewritten", detail=detail, graph=ctx.graph_index, **extra)


def measure_swap(ctx, site: Site, old: Any, new: Any, x: Any) -> Site:
    """With ``Config(measure=True)``: time ``old(x)`` against ``new(x)`` (forward, no grad; as
    CUDA-graph replays with ``Config(cuda_graphs=True)``) into ``site``. A timing that fails leaves
    the site unmeasured; it never undoes the conversion."""
    if ctx.config.measure:
        from ..measure import compare, device_of

        try:
            with torch.no_grad():
                site.set_measured(compare(lambda: old(x), lambda: new(x), device_of(x),
                                          graphs=ctx.config.cuda_graphs))
        except Exception:  # noqa: BLE001 - timing is a report detail, not part of the rewrite
            pass
    return site


class ModuleContext:
    """What a module pass sees: the model (to change), its captured graphs, config and report.

    Module swaps go through :meth:`swap`, which logs them so that a pass that fails can be undone.
    """

    graph_index = -1  # module-level sites are not tied to one graph

    def __init__(self, model: torch.nn.Module, graphs: list[GraphContext], config, report, device_spec=None):
        self.model = model
        self.graphs = graphs
        self.config = config
        self.report = report
        self.device_spec = device_spec
        self.stale = False  # set once modules changed after the graphs were captured
        self._swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def module(self, path: str) -> torch.nn.Module | None:
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None

    def device_name(self, tensor: torch.Tensor) -> str:
        """The cost model's name for the device (or the GPU's own name when the model has no spec)."""
        if self.device_spec is not None:
            return self.device_spec.name
        return torch.cuda.get_device_name(tensor.device) if tensor.is_cuda else tensor.device.type

    def swap(self, path: str, new: torch.nn.Module) -> torch.nn.Module:
        """Put ``new`` at ``path`` in the model; returns the module it replaced."""
        parent_path, _, name = path.rpartition(".")
        parent = self.module(parent_path)
        old = parent._modules[name]
        self._swaps.append((parent, name, old))
        parent._modules[name] = new
        return old

    def mark(self) -> int:
        return len(self._swaps)

    def revert(self, to: int = 0) -> None:
        """Undo the swaps made since ``mark()`` returned ``to``."""
        while len(self._swaps) > to:
            parent, name, old = self._swaps.pop()
            parent._modules[name] = old


class ModulePass(Pass):
    """Changes modules before compilation; subclasses implement :meth:`run`."""

    stage = "module"

    def run(self, ctx: ModuleContext) -> None:
        raise NotImplementedError

    def linear_candidates(self, ctx: ModuleContext, table: Any, guard: Callable[[Any], str | None]):
        """The linear modules of the captured graphs that a table-gated linear pass may convert,
        each with its description; the others are reported skipped: outside ``Config.modules``,
        refused by ``guard`` (a reason string), or on a device without a measured table."""
        from ..patterns.linear import linear_modules

        for lin in linear_modules(ctx.graphs, ctx.module):
            detail = lin.describe()
            if not ctx.config.selects(lin.path):
                self.skip(ctx, lin.path, "outside Config.modules", detail=detail)
                continue
            reason = guard(lin)
            if reason is None and table is None:
                reason = (f"no measured throughput table for {ctx.device_name(lin.module.weight)}: "
                          "run benchmarks/linear.py --table")
            if reason is not None:
                self.skip(ctx, lin.path, reason, detail=detail)
                continue
            yield lin, detail


# Bytes of example activations a linear pass evaluates at once (see linear_inputs).
ACTIVATION_BUDGET = 2 << 30


def linear_inputs(items: list, calls_of: Callable[[Any], list], budget: int = ACTIVATION_BUDGET):
    """Each item with the example values of its calls' inputs, ``{x node: value}``, where
    ``calls_of(item)`` gives the ``(graph, LinearSite)`` calls to evaluate. Items are evaluated graph
    by graph in batches of at most ``budget`` bytes (each batch replays its graph up to those
    nodes); an item whose calls span several graphs is evaluated on its own, graph by graph, last."""
    from ..patterns.ops import meta

    by_graph: dict[int, tuple[Any, list]] = {}
    spread = []
    for item in items:
        calls = calls_of(item)
        graphs = {id(g): g for g, _ in calls}
        if len(graphs) > 1:
            spread.append(item)
            continue
        by_graph.setdefault(id(calls[0][0]), (calls[0][0], []))[1].append(item)
    for g, group in by_graph.values():
        batch: list = []
        size = 0
        for i, item in enumerate(group):
            batch.append(item)
            size += sum(meta(s.x).numel() * meta(s.x).element_size() for _, s in calls_of(item))
            if size >= budget or i == len(group) - 1:
                values = g.evaluate([s.x for b in batch for _, s in calls_of(b)])
                for b in batch:
                    yield b, {s.x: values[s.x] for _, s in calls_of(b)}
                batch, size = [], 0
                del values
    for item in spread:
        values = {}
        calls = calls_of(item)
        for g in {id(g): g for g, _ in calls}.values():
            values.update(g.evaluate([s.x for h, s in calls if h is g]))
        yield item, values


class GraphPass(Pass):
    """Rewrites one captured graph; subclasses implement :meth:`run`."""

    def run(self, ctx: GraphContext) -> None:
        raise NotImplementedError

    def commit(self, ctx: GraphContext, rewrites: list[Rewrite]) -> None:
        """Validate (per config), apply the rewrites that pass, and report every one."""
        values: dict[Node, Any] = {}
        if ctx.config.validate and rewrites:
            from ..validate import extract

            need: set[Node] = set()
            for rw in rewrites:
                _, leaves = extract(ctx.gm, rw.output, rw.inputs)
                need.update(leaves)
            # (the leaves as the sites read them: with the in-place writes made before the sites)
            values = ctx.evaluate(need, until=[rw.output for rw in rewrites])
        for rw in rewrites:
            if ctx.config.validate:
                def build(graph: Graph, env: dict[Node, Node], rw=rw) -> Node:
                    return rw.emit(Builder(graph, validating=True), env)

                # Subgraphs are timed eagerly: recording an arbitrary subgraph can fail (a host sync
                # inside), while the converted linears below are known to record.
                check = check_rewrite(ctx.gm, rw.output, rw.inputs, rw.random_inputs, values, build,
                                      measure=ctx.config.measure)
                rw.site.checks.update(check.as_dict())
                if check.timing is not None:
                    rw.site.set_measured(check.timing)
                if not check.ok:
                    rw.site.status = "skipped"
                    rw.site.reason = f"validation failed, left as it was: {check.message}"
                    ctx.report.add(rw.site)
                    continue
            self._apply(ctx, rw)
            ctx.report.add(rw.site)

    def _apply(self, ctx: GraphContext, rw: Rewrite) -> None:
        with ctx.graph.inserting_before(rw.output):
            new = rw.emit(ctx.builder(like=rw.output), {n: n for n in rw.inputs})
        rw.output.replace_all_uses_with(new)
        for n in [rw.output] + rw.removable[::-1]:
            if not n.users and n.graph is ctx.graph:
                ctx.graph.erase_node(n)

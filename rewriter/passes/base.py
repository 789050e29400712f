"""What every pass is: a name, a matcher, a guard, a rewrite, and a report entry for each site.

A graph pass works on one captured graph through a :class:`~rewriter.context.GraphContext`. It
finds sites with a matcher from :mod:`rewriter.patterns`, decides per site (config, guard, cost
model), and hands each accepted site to :meth:`GraphPass.commit` as a :class:`Rewrite`. ``commit``
validates the rewrites (when the config says so), applies the ones that pass, and reports every
site either way. A pass never imports another pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch.fx import Graph, Node

from ..context import Builder, GraphContext
from ..report import Site
from ..validate import check_rewrite

__all__ = ["GraphPass", "Rewrite"]


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


class GraphPass:
    """Base class: subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    modes: ClassVar[tuple[str, ...]] = ("exact", "fast", "max")

    def run(self, ctx: GraphContext) -> None:
        raise NotImplementedError

    # -- helpers for subclasses ----------------------------------------------------------------
    def skip(self, ctx: GraphContext, where: str, reason: str, detail: str = "", **extra: Any) -> Site:
        return ctx.report.add(Site(self.name, self.kind, where, "skipped", detail=detail, reason=reason,
                                   graph=ctx.graph_index, **extra))

    def site(self, ctx: GraphContext, where: str, detail: str, **extra: Any) -> Site:
        """A site about to be rewritten (added to the report by :meth:`commit`)."""
        return Site(self.name, self.kind, where, "rewritten", detail=detail, graph=ctx.graph_index, **extra)

    def commit(self, ctx: GraphContext, rewrites: list[Rewrite]) -> None:
        """Validate (per config), apply the rewrites that pass, and report every one."""
        values: dict[Node, Any] = {}
        if ctx.config.validate and rewrites:
            from ..validate import extract

            need: set[Node] = set()
            for rw in rewrites:
                _, leaves = extract(ctx.gm, rw.output, rw.inputs)
                need.update(leaves)
            values = ctx.evaluate(need)
        for rw in rewrites:
            if ctx.config.validate:
                def build(graph: Graph, env: dict[Node, Node], rw=rw) -> Node:
                    return rw.emit(Builder(graph, validating=True), env)

                check = check_rewrite(ctx.gm, rw.output, rw.inputs, rw.random_inputs, values, build)
                rw.site.checks.update(check.as_dict())
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

"""The pass pipeline: run the configured passes over one captured graph, in order.

Each pass gets the graph as the previous one left it. After a pass the graph is linted and
recompiled; if the pass raises, or leaves a graph that does not lint, the graph is restored to its
state before that pass, the error goes into the report (the sites it had rewritten are marked
skipped with that reason), and the next pass runs. The user's model always runs.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch.fx import GraphModule

from .config import Config
from .context import GraphContext
from .cost import device_spec
from .passes import get_pass
from .patterns.graph import clone_graph
from .report import PassRun, Report

__all__ = ["run_passes", "input_device"]


def input_device(example_inputs: Sequence[Any]) -> torch.device | None:
    """The device of the first floating-point tensor input (the activations), else of any tensor."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.is_floating_point():
            return t.device
    return tensors[0].device if tensors else None


def _symbolic(gm: GraphModule, example_inputs: Sequence[Any]) -> bool:
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        return True
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("example_value")
        if isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape):
            return True
        if isinstance(v, torch.SymInt):
            return True
    return False


def run_passes(gm: GraphModule, example_inputs: Sequence[Any], config: Config, report: Report) -> GraphModule:
    """Run ``config``'s passes over ``gm`` in place, recording into ``report``; returns ``gm``."""
    graph_index = report.graphs
    report.graphs += 1
    names = [n for n in config.active_passes() if get_pass(n).stage == "graph"]
    if _symbolic(gm, example_inputs):
        report.note("a graph with dynamic (symbolic) shapes was left as it was; compile with "
                    "dynamic=False so each shape gets its own rewritten graph")
        for name in names:
            report.passes.append(PassRun(name, graph_index, "not run", "dynamic shapes"))
        return gm
    device = input_device(example_inputs)
    spec = device_spec(config.device) if config.device else device_spec(device)
    if spec is not None:
        report.device = spec.name
    else:
        report.device = f"{config.device or (device.type if device else 'unknown')} (unknown to the cost model: no estimates)"
    ctx = GraphContext(gm, example_inputs, config, report, graph_index, spec)
    for name in names:
        p = get_pass(name)
        before = clone_graph(gm.graph)
        first_site = len(report.sites)
        start = time.perf_counter()
        try:
            p.run(ctx)
            gm.graph.lint()
            gm.recompile()
        except Exception as exc:  # noqa: BLE001 - a failing pass must never break the model
            gm.graph = before
            gm.recompile()
            message = f"{type(exc).__name__}: {exc}"
            for s in report.sites[first_site:]:
                if s.rewritten:
                    s.status = "skipped"
                    s.reason = f"pass {name} failed and its changes were undone ({message})"
            report.passes.append(PassRun(name, graph_index, "error", message, time.perf_counter() - start))
            ctx = GraphContext(gm, example_inputs, config, report, graph_index, spec)
            continue
        report.passes.append(PassRun(name, graph_index, "ok", seconds=time.perf_counter() - start))
    return gm

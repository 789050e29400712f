"""What a pass sees: the graph, the real values it was captured with, and a way to add nodes.

Dynamo hands a backend real example tensors for every placeholder (user inputs, parameters and
buffers). :class:`GraphContext` uses them to evaluate parts of the graph: compile-time constants
(a mask built from ``arange``, a scale made by ``torch.full``) and the activations a site reads,
which validation replays. Evaluation never changes the user's state: tensors that a graph could
update in place (buffers, inputs) are cloned first and the RNG state is restored afterwards.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node

from .patterns.graph import ancestors, placeholder_kind, with_mutations, written_roots
from .patterns.ops import meta

__all__ = ["GraphContext", "Builder", "RANDOM_OPS"]

# Ops whose result is random: a subgraph containing one is never a compile-time constant.
RANDOM_OPS = {"dropout", "rand", "randn", "randint", "rand_like", "randn_like", "bernoulli",
              "multinomial", "normal", "uniform_", "native_dropout", "randperm", "feature_dropout",
              "alpha_dropout"}


def _target_name(node: Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class Builder:
    """Adds ``call_function`` nodes to a graph at its current insertion point.

    With a ``fake_mode``, each new node gets ``meta["example_value"]`` by running the function on
    the fake values of its arguments, so later passes can read shapes and dtypes as usual.
    """

    def __init__(self, graph: Graph, fake_mode: Any = None, like: Node | None = None, validating: bool = False):
        self.graph = graph
        self.validating = validating  # building a replacement only to check it (dropout off)
        self.fake_mode = fake_mode
        self.like = like

    def call(self, fn, *args, **kwargs) -> Node:
        node = self.graph.call_function(fn, tuple(args), dict(kwargs))
        if self.like is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in self.like.meta:
                    node.meta[key] = self.like.meta[key]
        if self.fake_mode is not None:
            fa = torch.fx.node.map_arg(args, meta)
            fk = torch.fx.node.map_arg(kwargs, meta)
            with self.fake_mode:
                node.meta["example_value"] = fn(*fa, **fk)
        return node


class GraphContext:
    """One captured graph with its example inputs, shared by the passes that run over it."""

    def __init__(self, gm: GraphModule, example_inputs: Iterable[Any], config, report, graph_index: int = 0,
                 device_spec=None):
        self.gm = gm
        self.example_inputs = list(example_inputs)
        self.config = config
        self.report = report
        self.graph_index = graph_index
        self.device_spec = device_spec
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.kinds = {
            n: placeholder_kind(n, self.example_inputs[i] if i < len(self.example_inputs) else None)
            for i, n in enumerate(self.placeholders)
        }
        self._static: dict[Node, bool] = {}
        self._scalars: dict[Node, float | None] = {}

    @property
    def graph(self) -> Graph:
        return self.gm.graph

    @property
    def fake_mode(self):
        for n in self.placeholders:
            v = meta(n)
            if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
                return v.fake_mode
        return None

    def builder(self, like: Node | None = None) -> Builder:
        return Builder(self.graph, self.fake_mode, like)

    def placeholder_value(self, node: Node) -> Any:
        return self.example_inputs[self.placeholders.index(node)]

    # -- compile-time constants -------------------------------------------------------------
    def is_static(self, node: Any) -> bool:
        """True when ``node`` depends on no user input, parameter or random op (buffers count as
        constant: they are taken at their value at compile time)."""
        if not isinstance(node, Node):
            return True
        if node in self._static:
            return self._static[node]
        result = True
        for n in ancestors([node]):
            if n.op == "placeholder" and self.kinds.get(n) != "buffer":
                result = False
                break
            if n.op in ("call_function", "call_method") and _target_name(n) in RANDOM_OPS:
                result = False
                break
            if n.op in ("call_module",):
                result = False
                break
        self._static[node] = result
        return result

    def scalar(self, x: Any) -> float | None:
        """``x`` as a Python float when it is a number or a one-element compile-time tensor."""
        if isinstance(x, bool):
            return None
        if isinstance(x, (int, float)):
            return float(x)
        if not isinstance(x, Node):
            return None
        if x in self._scalars:
            return self._scalars[x]
        value = None
        m = meta(x)
        if isinstance(m, torch.Tensor) and m.numel() == 1 and m.dtype.is_floating_point and self.is_static(x):
            value = float(self.evaluate([x])[x].item())
        elif isinstance(m, (int, float)) and not isinstance(m, bool) and self.is_static(x):
            value = float(self.evaluate([x])[x])
        self._scalars[x] = value
        return value

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, targets: Iterable[Node], until: Iterable[Node] = ()) -> dict[Node, Any]:
        """Real values of ``targets`` computed from the example inputs (only what they need), with
        the in-place writes into them made before the last target, or before the last of ``until``
        (the nodes that will use the values)."""
        targets = list(dict.fromkeys(targets))
        needed = with_mutations(list(self.graph.nodes), ancestors(targets), until=until)
        order = [n for n in self.graph.nodes if n in needed]
        remaining = {n: 0 for n in order}
        for n in order:
            for a in n.all_input_nodes:
                if a in remaining:
                    remaining[a] += 1
        keep = set(targets)
        interp = Interpreter(self.gm, garbage_collect_values=False)
        env: dict[Node, Any] = {}
        interp.env = env
        out: dict[Node, Any] = {}
        devices = sorted({v.device.index or 0 for v in self.example_inputs
                          if isinstance(v, torch.Tensor) and v.device.type == "cuda"})
        written = written_roots(order)
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for n in order:
                if n.op == "placeholder":
                    v = self.placeholder_value(n)
                    if isinstance(v, torch.Tensor) and (self.kinds.get(n) != "parameter" or n in written):
                        v = v.clone()  # the graph may update buffers, inputs or parameters in place
                    env[n] = v
                else:
                    env[n] = interp.run_node(n)
                if n in keep:
                    out[n] = env[n]
                for a in n.all_input_nodes:
                    if a in remaining:
                        remaining[a] -= 1
                        if remaining[a] == 0 and a not in keep:
                            env.pop(a, None)
        return out


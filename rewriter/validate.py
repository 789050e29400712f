"""Check a rewrite against the subgraph it replaces, before it is applied.

For each site the original subgraph (from the rewrite's inputs to the node it replaces) and the
replacement are built as small graphs and run on the same inputs: once on the activations the
example inputs produce, once on fresh random values of the same shapes and dtypes for the data
inputs (masks and other structure keep their real values). Both are compared with a float64 run of
the original:

* fp32 / fp64: relative error (Frobenius) of the rewrite against the original <= 1e-5, or no more
  than twice the original's own error against float64 (this covers TF32 matmuls on GPUs);
* bf16 / fp16: the rewrite's error against float64 is at most twice the original's (floor 1e-5);
* NaN and inf must sit in the same places.

Dropout is switched off on both sides while checking (random masks cannot be compared). Lossy
rewrites are checked by SQNR instead (:func:`sqnr_db`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node

from .patterns.graph import ancestors, with_mutations, written_roots
from .patterns.ops import op

__all__ = ["Check", "check_rewrite", "extract", "run_graph", "rel_err", "sqnr_db", "sample_rows", "tolerance_ok"]

_LOW = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Check:
    ok: bool
    max_rel_err: float = 0.0  # rewrite vs original, worst trial
    ref_rel_err: float = 0.0  # original vs float64, worst trial
    new_rel_err: float = 0.0  # rewrite vs float64, worst trial
    message: str = ""
    trials: list[dict[str, float]] = field(default_factory=list)
    timing: dict[str, Any] | None = None  # rewriter.measure.compare of original vs rewrite, if asked

    def as_dict(self) -> dict[str, Any]:
        return {"validated": True, "max_rel_err": _r(self.max_rel_err), "ref_rel_err": _r(self.ref_rel_err),
                "new_rel_err": _r(self.new_rel_err)}


def _r(x: float) -> float:
    return float(f"{x:.3g}") if math.isfinite(x) else x


def extract(gm: GraphModule, output: Node, inputs: Sequence[Node]) -> tuple[GraphModule, list[Node]]:
    """The subgraph computing ``output`` from ``inputs``; placeholders it reaches become inputs too."""
    stop = set(inputs)
    needed = with_mutations(list(gm.graph.nodes), ancestors([output], stop=stop), stop=stop)
    leaves = [n for n in gm.graph.nodes if n in needed and (n in stop or n.op == "placeholder")]
    g = Graph()
    env: dict[Node, Node] = {}
    for n in leaves:
        env[n] = g.placeholder(n.name)
    for n in gm.graph.nodes:
        if n in needed and n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[output])
    return GraphModule(gm, g), leaves


class _Runner(Interpreter):
    """Runs a graph with dropout off; with ``float64`` set, in double precision throughout."""

    def __init__(self, gm: GraphModule, float64: bool):
        super().__init__(gm)
        self.float64 = float64

    def _up(self, x: Any) -> Any:
        if isinstance(x, torch.dtype) and x in _LOW:
            return torch.float64
        if isinstance(x, torch.Tensor) and x.dtype in _LOW:
            return x.double()
        if isinstance(x, (list, tuple)):
            return type(x)(self._up(v) for v in x)
        if isinstance(x, dict):
            return {k: self._up(v) for k, v in x.items()}
        return x

    def run_node(self, n: Node) -> Any:
        o = op(n)
        if o is not None and o.name == "dropout":
            return self.env[o["input"]] if isinstance(o["input"], Node) else o["input"]
        if self.float64 and n.op == "call_method" and n.target in ("float", "half", "bfloat16"):
            return self.env[n.args[0]].double()
        return super().run_node(n)

    def fetch_args_kwargs_from_env(self, n: Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if self.float64:
            args, kwargs = self._up(args), self._up(kwargs)
        return args, kwargs

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        return self._up(value) if self.float64 else value


def run_graph(gm: GraphModule, inputs: Sequence[Any], float64: bool = False) -> Any:
    """``gm`` on ``inputs``; a graph that writes into one of its inputs in place gets copies of
    them, so the caller's values (and the next run on them) stay as they were."""
    if written_roots(gm.graph.nodes):
        inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in inputs]
    with torch.no_grad():
        return _Runner(gm, float64).run(*inputs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the finite positions, in float64 (0 when both are zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    finite = torch.isfinite(a64) & torch.isfinite(b64)
    diff = torch.linalg.vector_norm((a64 - b64)[finite]).item()
    ref = torch.linalg.vector_norm(b64[finite]).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref² / sum (ref - cand)²)."""
    r, c = reference.detach().double(), candidate.detach().double()
    noise = torch.sum((r - c) ** 2).item()
    signal = torch.sum(r ** 2).item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` evenly spaced rows of ``x`` flattened to 2-D (bounds the cost of a check)."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n, device=x.device).long()]


def tolerance_ok(dtype: torch.dtype, err_vs_orig: float, orig_vs_64: float, new_vs_64: float) -> bool:
    if dtype in (torch.float32, torch.float64):
        return err_vs_orig <= 1e-5 or new_vs_64 <= 2.0 * orig_vs_64
    return new_vs_64 <= max(2.0 * orig_vs_64, 1e-5)


def _same_nonfinite(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((torch.isnan(a) == torch.isnan(b)).all()) and bool(
        (torch.isinf(a) == torch.isinf(b)).all())


def check_rewrite(
    gm: GraphModule,
    output: Node,
    inputs: Sequence[Node],
    random_inputs: set[Node],
    values: dict[Node, Any],
    build: Callable[[Graph, dict[Node, Node]], Node],
    seed: int = 0,
    measure: bool = False,
    graphs: bool = False,
) -> Check:
    """Compare ``build`` (the replacement) with the original subgraph ending at ``output``.

    ``inputs`` are the nodes the replacement reads; ``values`` their example values (and those of
    any placeholder the original subgraph reaches). ``random_inputs`` may be redrawn at random.
    With ``measure``, a rewrite that passes is also timed against the original on the example
    values (``Check.timing``; as CUDA-graph replays with ``graphs``; a timing that fails leaves it
    None, never the check).
    """
    ref_gm, leaves = extract(gm, output, inputs)
    cand = Graph()
    env = {n: cand.placeholder(n.name) for n in leaves}
    cand.output(build(cand, env))
    cand_gm = GraphModule(gm, cand)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    trials = [[values[n] for n in leaves]]
    rnd = []
    for n in leaves:
        v = values[n]
        if n in random_inputs and isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            v = torch.randn(v.shape, generator=gen, dtype=torch.float32).to(device=v.device, dtype=v.dtype)
        rnd.append(v)
    trials.append(rnd)
    result = Check(True)
    for vals in trials:
        ref = run_graph(ref_gm, vals)
        new = run_graph(cand_gm, vals)
        ref64 = run_graph(ref_gm, vals, float64=True)
        if not isinstance(ref, torch.Tensor) or not isinstance(new, torch.Tensor):
            return Check(False, message="the subgraph does not produce one tensor")
        if ref.shape != new.shape or ref.dtype != new.dtype:
            return Check(False, message=f"the rewrite gives {tuple(new.shape)} {new.dtype}, "
                                        f"the original {tuple(ref.shape)} {ref.dtype}")
        e = rel_err(new, ref)
        e_ref = rel_err(ref, ref64)
        e_new = rel_err(new, ref64)
        result.trials.append({"rel_err": e, "ref_rel_err": e_ref, "new_rel_err": e_new})
        result.max_rel_err = max(result.max_rel_err, e)
        result.ref_rel_err = max(result.ref_rel_err, e_ref)
        result.new_rel_err = max(result.new_rel_err, e_new)
        if not _same_nonfinite(new, ref):
            result.ok = False
            result.message = "NaN/inf in different places than the original"
        elif not tolerance_ok(ref.dtype, e, e_ref, e_new):
            result.ok = False
            result.message = (f"differs from the original: relative error {e:.3g} "
                              f"(original vs float64 {e_ref:.3g}, rewrite vs float64 {e_new:.3g})")
        if not result.ok:
            break
    if measure and result.ok:
        from .measure import compare, device_of

        vals = trials[0]
        try:
            with torch.no_grad():
                result.timing = compare(lambda: ref_gm(*vals), lambda: cand_gm(*vals), device_of(vals),
                                        graphs=graphs)
        except Exception:  # noqa: BLE001 - a timing problem must not undo a checked rewrite
            result.timing = None
    return result

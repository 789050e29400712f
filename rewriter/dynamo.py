"""The ``rewriter`` torch.compile backend.

After installation ``torch.compile(model, backend="rewriter")`` works by name (the package
registers the backend through the ``torch_dynamo_backends`` entry point) and uses the default
:class:`~rewriter.Config`. ``rewriter.backend(config)`` gives a configured one. Either way the
report is reachable: a :class:`Backend` instance keeps it in ``.report``, and
``rewriter.last_report()`` returns the report of the backend used most recently (the named
backend's included).

Example::

    be = rewriter.backend(rewriter.Config(inductor=False))
    compiled = torch.compile(model, backend=be)
    compiled(x)
    print(be.report)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.fx import GraphModule

from .config import Config
from .patterns.graph import clone_graph
from .pipeline import run_passes
from .report import Report

__all__ = ["Backend", "backend", "rewriter_backend", "last_report"]

_last: list["Backend"] = []


class Backend:
    """A torch.compile backend: our passes, then Inductor (or the rewritten graph as it is)."""

    def __init__(self, config: Config | None = None):
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be a rewriter.Config, got {type(config).__name__}")
        self.config = config or Config()
        self.report = Report()
        self.modules_done = False  # set by rewriter.optimize(), which runs the module passes first

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        _last[:] = [self]
        if not self.modules_done:
            from .passes import get_pass

            skipped = [n for n in self.config.active_passes() if get_pass(n).stage == "module"]
            if skipped:
                self.report.note(f"module passes ({', '.join(skipped)}) change weights once, before "
                                 "compilation, and run only through rewriter.optimize()")
        original = clone_graph(gm.graph)
        try:
            gm = run_passes(gm, example_inputs, self.config, self.report)
        except Exception as exc:  # noqa: BLE001 - the model must still run
            gm.graph = original
            gm.recompile()
            self.report.note(f"the pass pipeline failed and the graph was left as it was: "
                             f"{type(exc).__name__}: {exc}")
        if not self.config.inductor:
            if self.config.cuda_graphs:
                self.report.note("cuda_graphs needs inductor=True for the graphs to be recorded here; the "
                                 "passes still decide as if the calls were replayed from CUDA graphs "
                                 "(record the optimized model yourself, e.g. with torch.cuda.graph)")
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        try:
            if self.config.cuda_graphs:
                return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})
            return compile_fx(gm, example_inputs)
        except Exception as exc:  # noqa: BLE001 - fall back to running the rewritten graph
            self.report.note(f"Inductor could not compile a rewritten graph, which runs uncompiled: "
                             f"{type(exc).__name__}: {exc}")
            return gm.forward


def backend(config: Config | None = None) -> Backend:
    """A configured backend for ``torch.compile(model, backend=rewriter.backend(config))``."""
    return Backend(config)


_default: list[Backend] = []


def rewriter_backend(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The backend registered as ``"rewriter"``: default config, one shared report."""
    if not _default:
        _default.append(Backend())
    return _default[0](gm, example_inputs)


def last_report() -> Report | None:
    """The report of the backend that compiled a graph most recently, or None."""
    return _last[0].report if _last else None

"""Measured gains, when ``Config(measure=True)`` asks for them.

The report's ``est_*`` figures come from the cost model; with ``measure=True`` the report also
carries timings taken on the machine, with the example inputs:

- per rewritten site of a graph pass: the original subgraph and its replacement, each run as a
  plain ``GraphModule`` (eager, no Inductor) on the example activations of that site, forward
  only; ``Site.measured_ms_before`` / ``measured_ms_after``;
- per converted linear (FP8, NVFP4, 2:4): the original module and the converted one on the example
  activations of that linear;
- the whole model (:attr:`Report.measured`): the original model, eager, against the optimized
  module as :func:`rewriter.optimize` returns it (Inductor included unless ``inductor=False``), on
  the example inputs, in the grad mode the model's training flag implies.

With ``Config(cuda_graphs=True)`` the converted linears are timed as CUDA-graph replays (what the
model then runs); the sites of graph passes stay eager (an arbitrary subgraph may not record).

Method (:func:`compare`): both callables are warmed up, then timed in alternating rounds (before,
after, before, after, ...) so that a clock or temperature drift hits both alike; each round runs
a burst of calls sized to about ``round_ms`` and records the mean per call; the result is the median
over rounds. On CUDA the burst is timed with events after a synchronize; on the CPU with
``time.perf_counter``. Per-site timings of eager subgraphs include Python dispatch overhead, as
the model's own eager execution does; a site that is a small part of a model can show a gain
that Inductor's fusion would give anyway, so the whole-model figure is the one to trust.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["compare", "device_of"]

ROUNDS = 7
ROUND_MS = 20.0
MAX_CALLS = 200


def device_of(values: Any) -> torch.device:
    """The device of the first tensor in ``values`` (nested lists, tuples, dicts), else CPU."""
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return torch.device("cpu")


def _burst(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Mean ms per call of ``calls`` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` recorded as a CUDA graph (after two warm-up calls on a side stream); its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _recover_from_failed_capture(device: torch.device) -> None:
    """After a capture that raised: clear the error state and end the CUDA random generator's
    capture mode. A capture that fails never reaches the generator's capture epilogue, so the next
    random op outside a graph would raise ("Offset increment outside graph capture"); an empty
    capture runs the prologue and epilogue once and leaves the generator as it was."""
    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - the failed capture's error surfaces here; it is handled
        pass
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pass
        del graph


def compare(before: Callable[[], Any], after: Callable[[], Any], device: torch.device | None = None,
            rounds: int | None = None, round_ms: float | None = None, graphs: bool = False) -> dict[str, Any]:
    """Time ``before`` and ``after`` (no-argument callables) in alternating rounds.

    Returns ``{"ms_before", "ms_after", "speedup", "calls", "rounds", "method"}``: medians of the
    mean ms per call, their ratio, the calls per round of each, and ``"eager"`` or ``"cuda graph"``
    (``"eager (no CUDA graph: ...)"`` when recording failed).
    ``rounds`` / ``round_ms`` default to :data:`ROUNDS` / :data:`ROUND_MS`. With ``graphs`` on a
    CUDA device both callables are recorded as CUDA graphs and their replays timed (GPU time, as a
    model run with CUDA graphs sees it); if either cannot be recorded, both are timed eagerly.
    """
    rounds = ROUNDS if rounds is None else rounds
    round_ms = ROUND_MS if round_ms is None else round_ms
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = "eager"
    if graphs and device.type == "cuda":
        try:
            before, after = _graphed(before, device), _graphed(after, device)
            method = "cuda graph"
        except Exception as exc:  # noqa: BLE001 - e.g. a host sync inside: time both eagerly instead
            _recover_from_failed_capture(device)
            method = f"eager (no CUDA graph: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    calls = {}
    for name, fn in (("before", before), ("after", after)):
        fn()  # warm-up (first-call allocations, lazy initialization)
        one = max(_burst(fn, 1, device), 1e-3)
        calls[name] = int(min(MAX_CALLS, max(1, round_ms / one)))
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(rounds):
        times["before"].append(_burst(before, calls["before"], device))
        times["after"].append(_burst(after, calls["after"], device))
    ms_before = statistics.median(times["before"])
    ms_after = statistics.median(times["after"])
    return {"ms_before": ms_before, "ms_after": ms_after,
            "speedup": ms_before / ms_after if ms_after > 0 else float("inf"),
            "calls": [calls["before"], calls["after"]], "rounds": rounds, "method": method}


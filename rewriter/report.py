"""The report: one entry per site every pass found, rewritten or not, and why.

Example::

    model = rewriter.optimize(model, (x,))
    print(model.report)              # a table per pass
    model.report.summary()           # {"passes": {...}, "est_saved_ms": ...}
    text = model.report.to_json()
    same = rewriter.Report.from_json(text)
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["Site", "PassRun", "Report"]

KINDS = ("attention", "ffn", "linear", "moe", "cudagraph")
STATUSES = ("rewritten", "skipped")


def _ms(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.2g}"


@dataclass
class Site:
    """One place in the model a pass looked at.

    ``detail`` says what was found and what it became (``causal, GQA 4:1, scale 0.125 -> sdpa``);
    ``reason`` says why a skipped site was left alone. ``est_speedup``/``est_saved_ms`` come from
    the cost model (None where the device is unknown). ``checks`` holds the validation figures
    (``max_rel_err``, ``ref_rel_err``, ``sqnr_db``) when the site was checked.
    ``measured_ms_before`` / ``measured_ms_after`` are timings of the site's original and
    rewritten form on the example activations, with ``Config(measure=True)`` only (forward, eager;
    see :mod:`rewriter.measure`).
    """

    pass_name: str
    kind: str
    where: str
    status: str
    detail: str = ""
    reason: str = ""
    est_speedup: float | None = None
    est_saved_ms: float | None = None
    target: str = ""
    checks: dict[str, Any] = field(default_factory=dict)
    graph: int = 0
    measured_ms_before: float | None = None
    measured_ms_after: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Site.kind must be one of {KINDS}, got {self.kind!r}")
        if self.status not in STATUSES:
            raise ValueError(f"Site.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"

    @property
    def measured_speedup(self) -> float | None:
        if self.measured_ms_before is None or not self.measured_ms_after:
            return None
        return self.measured_ms_before / self.measured_ms_after

    def set_measured(self, timing: dict[str, Any]) -> None:
        """Record a :func:`rewriter.measure.compare` result (before = original, after = rewrite)."""
        self.measured_ms_before = round(float(timing["ms_before"]), 6)
        self.measured_ms_after = round(float(timing["ms_after"]), 6)
        self.checks["timed_as"] = timing.get("method", "eager")


@dataclass
class PassRun:
    """One pass over one captured graph: how it went."""

    name: str
    graph: int
    status: str  # "ok", "error" (graph restored), "not run"
    message: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    """Everything the passes found and did, for every graph captured from the model."""

    sites: list[Site] = field(default_factory=list)
    passes: list[PassRun] = field(default_factory=list)
    device: str = ""
    notes: list[str] = field(default_factory=list)
    graphs: int = 0
    # Whole model, with Config(measure=True): {"original_ms", "optimized_ms", "speedup", "what"}.
    measured: dict[str, Any] = field(default_factory=dict)

    def add(self, site: Site) -> Site:
        self.sites.append(site)
        return site

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def by_pass(self) -> dict[str, list[Site]]:
        out: dict[str, list[Site]] = {}
        for run in self.passes:
            out.setdefault(run.name, [])
        for s in self.sites:
            out.setdefault(s.pass_name, []).append(s)
        return out

    def rewritten(self, pass_name: str | None = None) -> list[Site]:
        return [s for s in self.sites if s.rewritten and (pass_name is None or s.pass_name == pass_name)]

    def skipped(self, pass_name: str | None = None) -> list[Site]:
        return [s for s in self.sites if not s.rewritten and (pass_name is None or s.pass_name == pass_name)]

    def summary(self) -> dict[str, Any]:
        """Counts per pass and the total estimated time saved per call (ms, None if unknown)."""
        passes: dict[str, dict[str, Any]] = {}
        for name, sites in self.by_pass().items():
            errors = [r.message for r in self.passes if r.name == name and r.status == "error"]
            passes[name] = {
                "rewritten": sum(s.rewritten for s in sites),
                "skipped": sum(not s.rewritten for s in sites),
                "errors": len(errors),
            }
        saved = [s.est_saved_ms for s in self.sites if s.rewritten and s.est_saved_ms is not None]
        unknown = any(s.rewritten and s.est_saved_ms is None for s in self.sites)
        timed = [s for s in self.sites if s.rewritten and s.measured_speedup is not None]
        extra: dict[str, Any] = {}
        if timed:
            extra["measured_sites"] = len(timed)
            extra["measured_saved_ms"] = round(sum(s.measured_ms_before - s.measured_ms_after for s in timed), 6)
        if self.measured:
            extra["measured"] = dict(self.measured)
        return {
            "passes": passes,
            "sites": len(self.sites),
            "rewritten": sum(s.rewritten for s in self.sites),
            "est_saved_ms": None if unknown or not saved else round(sum(saved), 4),
            "device": self.device,
            "graphs": self.graphs,
            **extra,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [asdict(s) for s in self.sites],
            "passes": [asdict(p) for p in self.passes],
            "device": self.device,
            "notes": list(self.notes),
            "graphs": self.graphs,
            "measured": dict(self.measured),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        site_keys = {f.name for f in fields(Site)}
        run_keys = {f.name for f in fields(PassRun)}
        return cls(
            sites=[Site(**{k: v for k, v in s.items() if k in site_keys}) for s in data.get("sites", [])],
            passes=[PassRun(**{k: v for k, v in p.items() if k in run_keys}) for p in data.get("passes", [])],
            device=data.get("device", ""),
            notes=list(data.get("notes", [])),
            graphs=int(data.get("graphs", 0)),
            measured=dict(data.get("measured") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls.from_dict(json.loads(text))

    def render(self, width: int = 140) -> str:
        """The report as text: one table per pass, then totals."""
        from rich.console import Console
        from rich.table import Table

        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        by_pass = self.by_pass()
        header = f"rewriter report: {len(self.sites)} sites in {self.graphs} graph(s)"
        console.print(header + (f", estimates for {self.device}" if self.device else ""))
        for name, sites in by_pass.items():
            runs = [r for r in self.passes if r.name == name]
            errors = [r for r in runs if r.status == "error"]
            if not sites:
                console.print(f"pass {name}: no sites found")
                for r in errors:
                    console.print(f"  pass {name} failed on graph {r.graph} and was undone: {r.message}")
                continue
            table = Table(title=f"pass {name}: {sum(s.rewritten for s in sites)} rewritten, "
                                f"{sum(not s.rewritten for s in sites)} skipped",
                          title_justify="left", show_lines=False)
            timed = any(s.measured_speedup is not None for s in sites)
            cols = ["where", "status", "detail / reason", "target", "est. speedup", "est. saved ms"]
            for col in cols + (["measured (ms before -> after)"] if timed else []):
                table.add_column(col, overflow="fold")
            for s in sites:
                row = [
                    s.where,
                    s.status,
                    s.detail if s.rewritten else (f"{s.detail}: {s.reason}" if s.detail else s.reason),
                    s.target,
                    "-" if s.est_speedup is None else f"{s.est_speedup:.2f}x",
                    "-" if s.est_saved_ms is None else _ms(s.est_saved_ms),
                ]
                if timed:
                    sp = s.measured_speedup
                    row.append("-" if sp is None else
                               f"{sp:.2f}x ({_ms(s.measured_ms_before)} -> {_ms(s.measured_ms_after)})")
                table.add_row(*row)
            console.print(table)
            for r in runs:
                if r.status == "error":
                    console.print(f"  pass {name} failed on graph {r.graph} and was undone: {r.message}")
        summary = self.summary()
        saved = summary["est_saved_ms"]
        console.print(f"total: {summary['rewritten']} of {summary['sites']} sites rewritten; "
                      f"estimated saving {'unknown' if saved is None else _ms(saved) + ' ms'} per call")
        if "measured_sites" in summary:
            methods = sorted({s.checks.get("timed_as", "eager").split(" (")[0] for s in self.sites
                              if s.rewritten and s.measured_speedup is not None})
            console.print(f"measured at the sites: {_ms(summary['measured_saved_ms'])} ms saved per call over "
                          f"{summary['measured_sites']} timed site(s) (each alone, {' / '.join(methods)}, forward)")
        if self.measured:
            m = self.measured
            if m.get("original_ms") is not None:
                console.print(f"measured: {_ms(m['original_ms'])} ms original -> {_ms(m['optimized_ms'])} ms "
                              f"optimized per call ({m['speedup']:.2f}x); {m.get('what', '')}")
            elif m.get("note"):
                console.print(f"measured: {m['note']}")
        for n in self.notes:
            console.print(f"note: {n}")
        return buf.getvalue()

    def __str__(self) -> str:
        return self.render()

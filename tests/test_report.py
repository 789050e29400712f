"""Report: JSON round trip, summary, rendering, and validation of its fields."""

from __future__ import annotations

import pytest

import rewriter
from rewriter.report import PassRun


def make_report():
    r = rewriter.Report(device="H100", graphs=1)
    r.passes.append(PassRun("attention", 0, "ok", seconds=0.1))
    r.add(rewriter.Site("attention", "attention", "h.0.attn", "rewritten", detail="causal -> sdpa",
                        est_speedup=3.0, est_saved_ms=0.5, target="sdpa", checks={"max_rel_err": 1e-7}))
    r.add(rewriter.Site("attention", "attention", "h.1.attn", "skipped", reason="scores reused"))
    return r


def test_json_round_trip():
    r = make_report()
    again = rewriter.Report.from_json(r.to_json())
    assert again == r


def test_summary_counts_and_total():
    s = make_report().summary()
    assert s["passes"]["attention"] == {"rewritten": 1, "skipped": 1, "errors": 0}
    assert s["est_saved_ms"] == 0.5 and s["rewritten"] == 1 and s["sites"] == 2


def test_render_mentions_every_site_and_reason():
    text = str(make_report())
    assert "h.0.attn" in text and "h.1.attn" in text and "scores reused" in text
    assert "pass attention: 1 rewritten, 1 skipped" in text


def test_site_rejects_bad_kind_and_status():
    with pytest.raises(ValueError, match="kind"):
        rewriter.Site("x", "conv", "a", "rewritten")
    with pytest.raises(ValueError, match="status"):
        rewriter.Site("x", "attention", "a", "done")

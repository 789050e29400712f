"""Config(measure=True): measured gains per site and for the whole model, and the timing method."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import models as M
import rewriter
from rewriter import measure
from rewriter.cli import main as cli_main
from rewriter.passes.base import measure_swap
from utils import optimize, rel


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = M.NanoGPT(dim=32, heads=4)
        self.b = M.Einsum(dim=32, heads=4)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.fixture
def quick_timing(monkeypatch):
    # Short rounds keep the tests fast; the method is the same.
    monkeypatch.setattr(measure, "ROUNDS", 3)
    monkeypatch.setattr(measure, "ROUND_MS", 2.0)


def test_compare_alternates_and_takes_medians(monkeypatch):
    seen = []
    fake = {"before": iter([9.0, 2.0, 4.0, 3.0, 100.0]), "after": iter([9.0, 1.0, 1.0, 50.0, 2.0])}

    def burst(fn, calls, device):
        name = fn.__name__
        seen.append(name)
        return next(fake[name])

    def before():
        pass

    def after():
        pass

    monkeypatch.setattr(measure, "_burst", burst)
    t = measure.compare(before, after, torch.device("cpu"), rounds=4)
    # One calibration burst each, then strictly alternating rounds.
    assert seen == ["before", "after"] + ["before", "after"] * 4
    assert t["ms_before"] == 3.5 and t["ms_after"] == 1.5  # medians of (2, 4, 3, 100) and (1, 1, 50, 2)
    assert t["speedup"] == pytest.approx(3.5 / 1.5)
    assert t["rounds"] == 4


def test_compare_tells_a_slow_call_from_a_fast_one():
    x = torch.randn(256, 256)

    def slow():
        for _ in range(20):
            x @ x

    def fast():
        x @ x

    t = measure.compare(slow, fast, torch.device("cpu"), rounds=3, round_ms=5.0)
    assert t["ms_before"] > 0 and t["ms_after"] > 0
    assert t["speedup"] > 3.0, t


def test_measure_off_times_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("timed although measure=False")

    monkeypatch.setattr(measure, "compare", boom)
    opt = optimize(TwoBlocks().eval(), (torch.randn(2, 16, 32),))
    assert len(opt.report.rewritten("attention")) == 2
    assert all(s.measured_ms_before is None and s.measured_speedup is None for s in opt.report.sites)
    assert opt.report.measured == {}
    assert "measured" not in str(opt.report)
    assert "measured" not in opt.report.summary()


def test_measure_on_times_sites_and_model(quick_timing):
    model = TwoBlocks().eval()
    x = torch.randn(2, 16, 32)
    opt = optimize(model, (x,), measure=True)
    rep = opt.report
    sites = rep.rewritten("attention")
    assert len(sites) == 2
    for s in sites:
        assert s.measured_ms_before > 0 and s.measured_ms_after > 0
        assert s.measured_speedup == pytest.approx(s.measured_ms_before / s.measured_ms_after)
    m = rep.measured
    assert m["original_ms"] > 0 and m["optimized_ms"] > 0
    assert m["speedup"] == pytest.approx(m["original_ms"] / m["optimized_ms"], rel=1e-3)
    assert "against the original eager model" in m["what"] and "Inductor off" in m["what"]
    text = str(rep)
    assert "measured (ms before -> after)" in text and "measured:" in text
    summary = rep.summary()
    timed = [s for s in rep.sites if s.rewritten and s.measured_speedup is not None]
    # Every rewritten site of a graph pass was checked, so every one was timed: the attention
    # sites and the Q/K/V GEMMs fused in the graph. (Module pass fuse_linear only concatenates
    # the weights; the graph pass's sites carry its gain.)
    graph_sites = rep.rewritten("attention") + rep.rewritten("fuse_linear_graph")
    assert len(graph_sites) >= 3 and set(map(id, timed)) == set(map(id, graph_sites))
    assert summary["measured_sites"] == len(timed) and summary["measured"]["speedup"] == m["speedup"]
    again = rewriter.Report.from_json(rep.to_json())
    assert again == rep
    # Timing changed nothing: the result still matches the model.
    with torch.no_grad():
        assert rel(opt(x), model(x)) < 1e-5


def test_measure_keeps_buffers_and_rng(quick_timing):
    # A training-mode model with batch-norm statistics and dropout: the timing calls must leave
    # the running statistics and the random stream as they were.
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).train()
    x = torch.randn(4, 8)
    stats = model[1].running_mean.clone()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    opt = optimize(model, (x,), measure=True)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(model[1].running_mean, stats)
    assert opt.report.measured["original_ms"] > 0
    assert "with autograd" in opt.report.measured["what"]


def test_measure_with_inplace_times_the_original_modules(quick_timing):
    model = M.Einsum(dim=32, heads=4).eval()
    x = torch.randn(2, 16, 32)
    calls = []
    original_q = model.q
    original_q.register_forward_hook(lambda *a: calls.append(1))
    opt = optimize(model, (x,), measure=True, inplace=True)
    assert opt.report.measured["original_ms"] > 0
    assert calls, "the baseline did not run the model's own modules"


def test_timing_failure_is_reported_not_raised(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no timer")

    monkeypatch.setattr(measure, "compare", boom)
    model = TwoBlocks().eval()
    x = torch.randn(2, 16, 32)
    opt = optimize(model, (x,), measure=True)
    assert len(opt.report.rewritten("attention")) == 2  # the rewrites stand
    assert all(s.measured_speedup is None for s in opt.report.sites)
    assert opt.report.measured["note"].startswith("timing failed: RuntimeError: no timer")
    assert "measured: timing failed" in str(opt.report)
    with torch.no_grad():
        assert rel(opt(x), model(x)) < 1e-5


def test_measure_without_validation_says_what_was_timed(quick_timing):
    opt = optimize(TwoBlocks().eval(), (torch.randn(2, 16, 32),), measure=True, validate=False)
    assert all(s.measured_speedup is None for s in opt.report.sites)
    assert opt.report.measured["original_ms"] > 0
    assert any("validate=False" in n for n in opt.report.notes)


def test_measure_swap_times_both_modules(quick_timing):
    old, new = nn.Linear(16, 16), nn.Linear(16, 16)
    site = rewriter.Site("nvfp4", "linear", "fc", "rewritten")
    ctx = types.SimpleNamespace(config=rewriter.Config(measure=True))
    measure_swap(ctx, site, old, new, torch.randn(4, 16))
    assert site.measured_ms_before > 0 and site.measured_ms_after > 0
    off = rewriter.Site("nvfp4", "linear", "fc", "rewritten")
    measure_swap(types.SimpleNamespace(config=rewriter.Config()), off, old, new, torch.randn(4, 16))
    assert off.measured_ms_before is None


def test_measure_must_be_bool():
    with pytest.raises(TypeError, match="measure"):
        rewriter.Config(measure="yes")


def test_cli_measure(capsys, quick_timing):
    code = cli_main(["report", "hf:gpt2", "--layers", "1", "--hidden", "64", "--heads", "2", "--seq", "16",
                     "--measure"])
    assert code == 0
    out = capsys.readouterr().out
    assert "measured:" in out and "measured (ms before -> after)" in out


def test_cuda_graphs_config_reaches_inductor(monkeypatch):
    import torch._inductor.compile_fx as cf

    seen = []

    def fake_compile_fx(gm, example_inputs, **kwargs):
        seen.append(kwargs)
        return gm.forward

    monkeypatch.setattr(cf, "compile_fx", fake_compile_fx)
    x = torch.randn(2, 16, 32)
    model = M.Einsum(dim=32, heads=4).eval()
    opt = optimize(model, (x,), inductor=True, cuda_graphs=True)
    assert seen and seen[-1] == {"config_patches": {"triton.cudagraphs": True}}
    opt = optimize(M.Einsum(dim=32, heads=4).eval(), (x,), inductor=True)
    assert seen[-1] == {}
    # Without Inductor there is nothing to record the graphs: said, not raised.
    opt = optimize(M.Einsum(dim=32, heads=4).eval(), (x,), cuda_graphs=True)
    assert any("cuda_graphs needs inductor=True" in n for n in opt.report.notes)
    with pytest.raises(TypeError, match="cuda_graphs"):
        rewriter.Config(cuda_graphs=1)


def test_graph_timing_falls_back_to_eager_off_cuda():
    x = torch.randn(64, 64)
    t = measure.compare(lambda: x @ x, lambda: x + x, torch.device("cpu"), rounds=2, round_ms=1.0, graphs=True)
    assert t["method"] == "eager" and t["ms_before"] > 0


@pytest.mark.gpu
def test_gpu_graph_timing_and_its_fallback():
    x = torch.randn(1024, 1024, device="cuda")
    t = measure.compare(lambda: x @ x, lambda: x + x, torch.device("cuda"), rounds=3, round_ms=2.0, graphs=True)
    assert t["method"] == "cuda graph" and t["speedup"] > 1.0, t
    # A host sync cannot be recorded: both sides are then timed eagerly, and the failed recording
    # leaves the CUDA random generator usable.
    t = measure.compare(lambda: (x @ x).sum().item(), lambda: x + x, torch.device("cuda"), rounds=2,
                        round_ms=2.0, graphs=True)
    assert t["method"].startswith("eager (no CUDA graph: ") and t["ms_before"] > 0
    torch.randn(4, device="cuda")
    torch.nn.functional.dropout(x, 0.5)


@pytest.mark.gpu
def test_gpu_converted_linears_timed_as_graphs(quick_timing):
    old, new = torch.nn.Linear(256, 256).cuda(), torch.nn.Linear(256, 256).cuda()
    site = rewriter.Site("nvfp4", "linear", "fc", "rewritten")
    ctx = types.SimpleNamespace(config=rewriter.Config(measure=True, cuda_graphs=True))
    measure_swap(ctx, site, old, new, torch.randn(4, 256, device="cuda"))
    assert site.checks["timed_as"] == "cuda graph" and site.measured_ms_after > 0
    # Sites of graph passes stay eager, cuda_graphs or not.
    model = TwoBlocks().cuda().eval()
    opt = optimize(model, (torch.randn(2, 64, 32, device="cuda"),), measure=True, cuda_graphs=True, inductor=True)
    timed = [s for s in opt.report.sites if s.measured_speedup is not None]
    assert timed and all(s.checks["timed_as"] == "eager" for s in timed)
    assert opt.report.measured["optimized_ms"] > 0

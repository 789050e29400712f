"""The NVFP4 pass: converts where the measured table says it pays, matches the dequantized reference,
rolls back under the SQNR floor, shrinks the module, and leaves every look-alike alone with a reason.

There is no GPU here: "CUDA with a table" is simulated by handing the pass's cost decision the
device type "cuda" and a synthetic table; everything after the decision (quantizing, the SQNR check
on the example activations, the swap, the report) runs for real. Converted layers compute with the
dequantize-then-matmul reference on the CPU; the Triton kernel is compared with it through the
interpreter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
import rewriter.passes.nvfp4 as nvfp4_pass
from rewriter.cost import LinearTable
from rewriter.kernels.nvfp4 import NVFP4Linear, nvfp4_linear, pack_nvfp4, unpack_nvfp4
from rewriter.validate import sqnr_db
from rewriter.passes.nvfp4 import convert_linears, nvfp4_convertible, nvfp4_cost
from utils import optimize

CPU_REASON = "NVFP4 kernels need a CUDA GPU; on CPU it would only dequantize"


class MLP(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def mlp(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return MLP().to(dtype).eval()


def x_for(model, *shape):
    dtype = next(model.parameters()).dtype
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def table(bf16_ms, nvfp4_ms, ms=(1, 1024), k=64, n=128):
    """A synthetic measured table: one (K, N) (the nearest shape stands for every other) and the
    same times at each M in ``ms``; times may also be given per M as lists."""
    bf = bf16_ms if isinstance(bf16_ms, (list, tuple)) else [bf16_ms] * len(ms)
    nv = nvfp4_ms if isinstance(nvfp4_ms, (list, tuple)) else [nvfp4_ms] * len(ms)
    return LinearTable("synthetic", [{"M": m, "K": k, "N": n, "bf16_ms": a, "nvfp4_ms": b}
                                     for m, a, b in zip(ms, bf, nv)])


@pytest.fixture
def on_cuda_with(monkeypatch):
    """Make the pass decide as on a CUDA device whose measured table is ``t``."""
    real = nvfp4_pass.nvfp4_cost

    def install(t):
        monkeypatch.setattr(nvfp4_pass, "nvfp4_cost",
                            lambda device_type, *args, **kw: real("cuda", *args[:4], **kw))
        monkeypatch.setattr(nvfp4_pass, "linear_table", lambda spec: t)

    return install


def run_pass(model, x, **config):
    config.setdefault("mode", "fast")
    config.setdefault("enable", ("nvfp4",))
    # The synthetic tables save a few microseconds per call, which pays only where CUDA graphs
    # hide the launches (tested on its own below).
    config.setdefault("cuda_graphs", True)
    return optimize(model, (x,), **config)


def sites(opt):
    return {s.where: s for s in opt.report.sites if s.pass_name == "nvfp4"}


def stored_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# --------------------------------------------------------------------------------------------------
# The forced path
# --------------------------------------------------------------------------------------------------


def test_forced_conversion_fires_and_matches_dequantized_reference():
    model = mlp()
    original = copy.deepcopy(model)
    x = x_for(model, 2, 4, 64)
    done = convert_linears(model)
    assert [c.path for c in done] == ["up", "down"]
    assert all(isinstance(getattr(model, c.path), NVFP4Linear) for c in done)
    for c in done:
        # Gaussian weights lose ~20 dB to 4-bit values with a scale per 16; 15 dB is the pass's floor.
        assert c.weight_sqnr_db >= 15, c
        assert c.dtype == torch.bfloat16
    with torch.no_grad():
        ref_full = copy.deepcopy(original).float()(x.float())
        got = model(x)
        assert sqnr_db(ref_full, got.float()) >= 15
        # Each layer computes F.linear with the weight dequantized from its own packing, in fp32.
        w = unpack_nvfp4(pack_nvfp4(original.up.weight))
        want = F.linear(x.float(), w, original.up.bias.float()).to(torch.bfloat16)
        assert torch.equal(model.up(x), want)
        # The Triton kernel (interpreter on the CPU) computes the same, up to bf16 rounding of its output.
        q = model.down
        hin = F.gelu(model.up(x))
        kernel = nvfp4_linear(hin, q.nvfp4_weight(), q.bias, use_triton=True)
        assert torch.allclose(kernel.float(), q(hin).float(), rtol=2**-7, atol=1e-4)


def test_forced_conversion_filter_and_shared_module():
    model = mlp()
    assert [c.path for c in convert_linears(copy.deepcopy(model), lambda m, path: path != "down")] == ["up"]
    shared = nn.Sequential(model.up, nn.GELU(), nn.Linear(128, 64).to(torch.bfloat16))
    shared.add_module("again", shared[0])
    done = convert_linears(shared)
    # One NVFP4 module (and one Conversion, so that bytes add up) for the Linear at two paths.
    assert [c.path for c in done] == ["0", "2"]
    assert shared[0] is shared.again is done[0].module


def test_forced_conversion_skips_non_finite_weights():
    model = mlp()
    with torch.no_grad():
        model.down.weight[3, 5] = float("inf")
    assert nvfp4_convertible(model.down) == "the weight holds NaN or inf"
    assert [c.path for c in convert_linears(model)] == ["up"]
    assert type(model.down) is nn.Linear


def test_forced_conversion_converts_fp32_and_saves_memory():
    model = mlp(torch.float32)
    x = x_for(model, 3, 64)
    with torch.no_grad():
        want = model(x)
    before = stored_bytes(model)
    done = convert_linears(model)
    assert len(done) == 2
    with torch.no_grad():
        assert sqnr_db(want, model(x)) >= 15
    # fp32 weights: 4 B/element -> 0.5625 B/element (+ 4 B of global scale per layer); biases stay.
    saved = sum(c.bytes_saved for c in done)
    assert saved == sum(4 * 64 * 128 - (64 * 128 // 2 + 64 * 128 // 16 + 4) for _ in done)
    assert stored_bytes(model) == before - saved


# --------------------------------------------------------------------------------------------------
# The cost decision
# --------------------------------------------------------------------------------------------------


def test_cost_decision_rules():
    pays = table(2.0, 1.0)
    assert nvfp4_cost("cpu", pays, [1], 64, 128) == nvfp4_pass.CostDecision(False, CPU_REASON)
    no_table = nvfp4_cost("cuda", None, [1], 64, 128)
    assert not no_table.convert and "no measured table" in no_table.reason
    yes = nvfp4_cost("cuda", pays, [1], 64, 128)
    assert yes.convert and yes.est_speedup == pytest.approx(2.0) and yes.est_saved_ms == pytest.approx(1.0)
    # Other shapes use the nearest measured one, scaled by K*N, and say so.
    other = nvfp4_cost("cuda", pays, [1], 128, 256)
    assert other.convert and "nearest measured shape K=64 N=128" in other.note
    assert other.est_saved_ms == pytest.approx(4.0)
    # GPUs with FP4 tensor cores: not this kernel's job, said so.
    blackwell = nvfp4_cost("cuda", pays, [1], 64, 128, (10, 0))
    assert not blackwell.convert and "FP4 tensor cores" in blackwell.reason
    assert nvfp4_cost("cuda", pays, [1], 64, 128, (9, 0)).convert
    no_column = LinearTable("synthetic", [{"M": 1, "K": 64, "N": 128, "bf16_ms": 1.0}])
    missing = nvfp4_cost("cuda", no_column, [1], 64, 128)
    assert not missing.convert and "no nvfp4/bf16 times" in missing.reason


def test_cost_decision_follows_m_and_sums_calls():
    # Pays at M <= 16, loses from M = 64 on, as measured on the H200.
    t = table([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 2.0, 2.0], ms=(1, 16, 64, 256))
    assert nvfp4_cost("cuda", t, [1], 64, 128).convert
    assert nvfp4_cost("cuda", t, [16], 64, 128).convert
    lose = nvfp4_cost("cuda", t, [256], 64, 128)
    assert not lose.convert and lose.est_speedup == pytest.approx(0.5) and "M=256" in lose.reason
    # Two calls of one layer: the times add up (1 + 1) / (0.5 + 2).
    both = nvfp4_cost("cuda", t, [1, 256], 64, 128)
    assert not both.convert and both.est_speedup == pytest.approx(2.0 / 2.5)


# --------------------------------------------------------------------------------------------------
# The pass through rewriter.optimize
# --------------------------------------------------------------------------------------------------


def test_skipped_on_cpu_without_forcing():
    model = mlp()
    x = x_for(model, 2, 4, 64)
    opt = run_pass(model, x)
    found = sites(opt)
    assert set(found) == {"up", "down"}
    assert all(s.status == "skipped" and s.reason == CPU_REASON for s in found.values())
    assert all(type(m) is nn.Linear for m in (opt.model.up, opt.model.down))
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


def test_converted_where_the_table_says_it_pays(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    model = mlp()
    x = x_for(model, 2, 4, 64)
    opt = run_pass(model, x)
    found = sites(opt)
    assert [s.status for s in found.values()] == ["rewritten", "rewritten"], opt.report
    for where, (k, n) in (("up", (64, 128)), ("down", (128, 64))):
        s = found[where]
        assert s.target == "nvfp4" and s.kind == "linear" and s.est_speedup == pytest.approx(2.0)
        assert s.checks["sqnr_db"] >= 15
        assert s.checks["bytes_saved"] == 2 * n * k - (n * k // 2 + n * k // 16 + 4)
        assert "M 8" in s.detail and "SQNR" in s.detail
        assert isinstance(getattr(opt.model, where), NVFP4Linear)
        # The user's model is left as it was.
        assert type(getattr(model, where)) is nn.Linear
    assert any("inference-only" in note for note in opt.report.notes)
    forced = copy.deepcopy(model)
    convert_linears(forced)
    with torch.no_grad():
        got = opt(x)
        assert torch.equal(got, forced(x))
        assert sqnr_db(model.float()(x.float()), got.float()) >= 15


def test_converted_modules_hold_only_the_packed_weight(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    model = mlp()
    opt = run_pass(model, x_for(model, 2, 4, 64))
    for where in ("up", "down"):
        new, old = getattr(opt.model, where), getattr(model, where)
        assert "weight" not in dict(new.named_parameters()) and "weight" not in dict(new.named_buffers())
        assert all(t.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float32, torch.bfloat16) for t in new.buffers())
        n, k = old.weight.shape
        assert stored_bytes(new) == n * k // 2 + n * k // 16 + 4 + 2 * n
        assert stored_bytes(new) < 0.3 * stored_bytes(old)


def test_not_converted_where_the_table_says_it_does_not(on_cuda_with):
    on_cuda_with(table([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 2.0, 2.0], ms=(1, 16, 64, 256)))
    model = mlp()
    big = run_pass(model, x_for(model, 4, 64, 64))  # M = 256
    for s in sites(big).values():
        assert s.status == "skipped" and "0.50x against bf16 at M=256" in s.reason
        assert s.est_speedup == pytest.approx(0.5)
    assert all(type(m) is nn.Linear for m in (big.model.up, big.model.down))
    small = run_pass(model, x_for(model, 1, 1, 64))  # M = 1: decode
    assert [s.status for s in sites(small).values()] == ["rewritten", "rewritten"]


def test_no_table_on_cuda_skips(on_cuda_with):
    on_cuda_with(None)
    model = mlp()
    found = sites(run_pass(model, x_for(model, 2, 64)))
    assert all(s.status == "skipped" and "no measured table" in s.reason for s in found.values())


def test_sqnr_floor_rolls_back(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))

    class Outliers(nn.Module):
        """Each block of 16 weights holds one huge value at the position of an input that is always 0:
        its scale flushes the other 15 to zero, so the output (which only they make) is lost."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 16, bias=False)
            with torch.no_grad():
                self.lin.weight.normal_(0, 0.02)
                self.lin.weight[:, ::16] = 1000.0

        def forward(self, x):
            return self.lin(x)

    model = Outliers().to(torch.bfloat16).eval()
    x = x_for(model, 8, 32)
    x[:, ::16] = 0
    opt = run_pass(model, x)
    (s,) = sites(opt).values()
    assert s.status == "skipped" and "under min_sqnr_db['nvfp4'] = 15 dB" in s.reason
    assert s.checks["sqnr_db"] < 1 and s.target == "nvfp4"
    assert type(opt.model.lin) is nn.Linear
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))
    # The floor alone decided: lowered, the same site is converted.
    low = run_pass(model, x, min_sqnr_db={"nvfp4": -10.0})
    assert sites(low)["lin"].status == "rewritten" and isinstance(low.model.lin, NVFP4Linear)


def test_mode_and_opt_in(on_cuda_with):
    with pytest.raises(ValueError, match="lossy"):
        rewriter.Config(mode="exact", enable=("nvfp4",))
    assert "nvfp4" not in rewriter.Config(mode="fast").active_passes()
    assert "nvfp4" not in rewriter.Config(mode="max").active_passes()
    assert "nvfp4" in rewriter.Config(mode="fast", enable=("nvfp4",)).active_passes()
    assert "nvfp4" not in rewriter.Config(mode="fast", enable=("nvfp4",), disable=("nvfp4",)).active_passes()
    on_cuda_with(table(2.0, 1.0))
    model = mlp()
    opt = run_pass(model, x_for(model, 2, 64), enable=())
    assert not sites(opt) and type(opt.model.up) is nn.Linear


def test_training_mode_skips_every_site(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    model = mlp().train()
    opt = run_pass(model, x_for(model, 2, 64))
    found = sites(opt)
    assert len(found) == 2 and all(s.status == "skipped" and "inference only" in s.reason for s in found.values())
    assert all(type(m) is nn.Linear for m in (opt.model.up, opt.model.down))


def test_fp32_model_skipped_with_reason(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    model = mlp(torch.float32)
    found = sites(run_pass(model, x_for(model, 2, 64)))
    assert len(found) == 2
    assert all(s.status == "skipped" and s.reason.startswith("weights are float32") for s in found.values())


def test_config_modules_limits_the_sites(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    model = mlp()
    found = sites(run_pass(model, x_for(model, 2, 64), modules=r"^up$"))
    assert found["up"].status == "rewritten"
    assert found["down"].status == "skipped" and found["down"].reason == "outside Config.modules"


class OwnWeight(nn.Module):
    """Holds a weight like a linear layer but is not an nn.Linear."""

    def __init__(self, k, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) * 0.05)

    def forward(self, x):
        return x @ self.weight.t()


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class LookAlikes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 64)     # the control: converted
        self.own = OwnWeight(64, 24)     # a weight, but no nn.Linear
        self.odd = nn.Linear(24, 32)     # K = 24: not a multiple of 16
        self.sub = Doubled(32, 32)       # an nn.Linear subclass with its own forward
        self.emb = nn.Embedding(50, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.reader = nn.Linear(32, 32)  # its weight is also read by the parent

    def forward(self, x, ids):
        y = self.sub(self.odd(self.own(self.lin(x))))
        return self.reader(y) * self.reader.weight.norm(), self.head(self.emb(ids))


def test_look_alikes_left_alone(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    torch.manual_seed(0)
    model = LookAlikes().to(torch.bfloat16).eval()
    x, ids = x_for(model, 2, 32), torch.randint(0, 50, (2, 3))
    opt = optimize(model, (x, ids), mode="fast", enable=("nvfp4",))
    found = sites(opt)
    assert found["lin"].status == "rewritten"
    assert found["own"].status == "skipped" and "OwnWeight is not an nn.Linear" in found["own"].reason
    assert found["odd"].status == "skipped" and "K=24 is not a multiple of 16" in found["odd"].reason
    assert found["sub"].status == "skipped" and "Doubled subclasses nn.Linear" in found["sub"].reason
    assert found["head"].status == "skipped" and "tied to emb.weight" in found["head"].reason
    assert found["reader"].status == "skipped" and "also read outside its forward" in found["reader"].reason
    assert isinstance(opt.model.lin, NVFP4Linear)
    assert [type(m) for m in (opt.model.own, opt.model.odd, opt.model.sub, opt.model.head, opt.model.reader)] == \
        [OwnWeight, nn.Linear, Doubled, nn.Linear, nn.Linear]
    # The forced path sees no graph: it converts every nn.Linear with a usable K, the tied head (a
    # packed copy; the embedding keeps the dense weight) and the reader included, whose parent then
    # finds no .weight to read.
    forced = copy.deepcopy(model)
    assert sorted(c.path for c in convert_linears(forced)) == ["head", "lin", "reader"]
    with torch.no_grad(), pytest.raises(AttributeError, match="weight"):
        forced(x, ids)
    assert nvfp4_convertible(model.odd).startswith("K=24")


def test_tied_weight_skipped_even_when_the_other_owner_is_not_called(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, h):
            return self.head(h)

    model = Head().to(torch.bfloat16).eval()
    (s,) = sites(run_pass(model, x_for(model, 2, 32))).values()
    assert s.where == "head" and s.status == "skipped" and "tied to emb.weight" in s.reason


def test_module_registered_at_two_paths_skipped(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU()).to(torch.bfloat16).eval()
    model.add_module("again", model[0])
    found = sites(run_pass(model, x_for(model, 2, 32)))
    assert found and all(s.status == "skipped" and "several paths (0, again)" in s.reason for s in found.values())


def test_model_that_is_itself_a_linear_left_alone(on_cuda_with):
    on_cuda_with(table(2.0, 1.0))
    model = nn.Linear(32, 32).to(torch.bfloat16).eval()
    (s,) = sites(run_pass(model, x_for(model, 2, 32))).values()
    assert s.status == "skipped" and "the model itself is the linear" in s.reason


@pytest.mark.gpu
def test_on_cuda_the_compiled_model_runs_the_kernel(monkeypatch):
    # A real CUDA device: only the table is synthetic. Inductor compiles the converted model.
    monkeypatch.setattr(nvfp4_pass, "linear_table", lambda spec: table(2.0, 1.0))
    model = mlp().cuda()
    x = x_for(model, 1, 1, 64).cuda()
    opt = run_pass(model, x, inductor=True)
    assert [s.status for s in sites(opt).values()] == ["rewritten", "rewritten"], opt.report
    forced = copy.deepcopy(model)
    convert_linears(forced)
    with torch.no_grad():
        got, want = opt(x), forced(x)  # eager NVFP4Linear on CUDA runs the Triton kernel
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-3)
        assert sqnr_db(model.float()(x.float()), got.float()) >= 15


def test_without_cuda_graphs_host_time_decides(on_cuda_with):
    # 2.0 -> 1.0 ms per call saves far more than the host cost of a launch: converted either way.
    on_cuda_with(table(2.0, 1.0))
    model = nn.Sequential(nn.Linear(64, 128)).to(torch.bfloat16).eval()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    opt = run_pass(copy.deepcopy(model), x, cuda_graphs=False)
    assert len(opt.report.rewritten("nvfp4")) == 1
    # 0.030 -> 0.015 ms is 2x on the GPU but saves less than one call's extra host time.
    on_cuda_with(table(0.030, 0.015))
    opt = run_pass(copy.deepcopy(model), x, cuda_graphs=False)
    (site,) = opt.report.skipped("nvfp4")
    assert "host time" in site.reason and "cuda_graphs=True" in site.reason
    assert isinstance(opt.model[0], nn.Linear)
    opt = run_pass(copy.deepcopy(model), x, cuda_graphs=True)
    assert len(opt.report.rewritten("nvfp4")) == 1
    # The rule itself: the GPU time saved per call against HOST_EXTRA_MS (0.09 ms) per call.
    assert nvfp4_pass.HOST_EXTRA_MS == 0.09
    assert nvfp4_pass.nvfp4_cost("cuda", table(0.2, 0.1), [1], 64, 128, cuda_graphs=False).convert
    assert nvfp4_pass.nvfp4_cost("cuda", table(0.2, 0.1), [1, 1], 64, 128, cuda_graphs=False).convert
    assert not nvfp4_pass.nvfp4_cost("cuda", table(0.1, 0.05), [1], 64, 128, cuda_graphs=False).convert
    assert nvfp4_pass.nvfp4_cost("cuda", table(0.1, 0.05), [1], 64, 128, cuda_graphs=True).convert

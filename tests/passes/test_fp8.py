"""The FP8 pass: converts the linears a measured table says pay, leaves every other one alone with a
reason, rolls back under the SQNR floor, and keeps the state dict loadable.

On the CPU torchao refuses FP8 (it asserts a GPU of compute capability 8.9), so the tests that
convert patch that hardware check, and ours, and run torchao's real ``Float8Tensor`` on the CPU; the
GPU tests at the end run it where it belongs.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
import rewriter.passes.fp8 as fp8
from utils import write_linear_table
from rewriter.validate import sqnr_db

BF16 = torch.bfloat16


class MLP(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def table_for(shapes, fp8_at=lambda m: 0.5, others=None):
    """bf16 takes 1 ms everywhere; FP8 takes ``fp8_at(M)`` ms; M in 1, 16, 1024."""
    return [(m, k, n, {"bf16": 1.0, "fp8": fp8_at(m), **(others or {})}) for k, n in shapes for m in (1, 16, 1024)]


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """Let FP8 run on the CPU: our device check and torchao's hardware assertion both pass."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(fp8, "fp8_device_support", lambda device: None)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def run(model, x, **config):
    config.setdefault("mode", "fast")
    config.setdefault("device", "H200")
    config.setdefault("inductor", False)
    return rewriter.optimize(model, (x,), config=rewriter.Config(**config))


def sites(opt, status=None):
    return {s.where: s for s in opt.report.sites if s.pass_name == "fp8" and (status is None or s.status == status)}


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().to(BF16).eval()


X_BIG = lambda: torch.randn(4, 256, 64, dtype=BF16)  # M = 1024
X_SMALL = lambda: torch.randn(1, 16, 64, dtype=BF16)  # M = 16


def test_converts_where_the_table_says_it_pays(data_dir, fp8_on_cpu):
    from torchao.quantization import Float8Tensor

    write_linear_table(data_dir, table_for([(64, 128), (128, 64)], fp8_at=lambda m: 0.5 if m >= 1024 else 2.0))
    model, x = mlp(), X_BIG()
    original = model.up.weight.detach().clone()
    opt = run(model, x)
    done = sites(opt, "rewritten")
    assert set(done) == {"up", "down"}, str(opt.report)
    up = done["up"]
    assert up.target == "fp8" and up.detail.startswith("M 1024, K 64, N 128: fp8 row-wise dynamic")
    assert up.est_speedup == 2.0 and up.est_saved_ms == 0.5
    assert 20 <= up.checks["sqnr_db"] < 60  # FP8 (3 mantissa bits) is lossy: ~30 dB, not exact
    assert isinstance(opt.model.up.weight, Float8Tensor) and isinstance(opt.model.down.weight, Float8Tensor)
    # the user's model is untouched
    assert type(model.up.weight) is nn.Parameter and torch.equal(model.up.weight, original)
    with torch.no_grad():
        assert sqnr_db(model(x), opt(x)) > 20


def test_left_alone_where_the_table_says_slower(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)], fp8_at=lambda m: 0.5 if m >= 1024 else 2.0))
    opt = run(mlp(), X_SMALL())
    skipped = sites(opt, "skipped")
    assert set(skipped) == {"up", "down"} and not sites(opt, "rewritten")
    assert "predicted fp8 row-wise dynamic 0.50x at M 16, K 64, N 128" in skipped["up"].reason
    assert skipped["up"].est_speedup == 0.5
    assert type(opt.model.up) is nn.Linear and type(opt.model.up.weight) is nn.Parameter


def test_needs_more_than_the_margin(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)], fp8_at=lambda m: 1.0 / 1.01))  # 1.01x
    opt = run(mlp(), X_BIG())
    assert not sites(opt, "rewritten")
    assert f"converts above {fp8.MIN_SPEEDUP}x" in sites(opt)["up"].reason


def test_skipped_without_a_table(data_dir, fp8_on_cpu):
    opt = run(mlp(), X_BIG())
    reason = sites(opt)["up"].reason
    assert reason == "no measured throughput table for H200: run benchmarks/linear.py --table"


def test_skipped_on_cpu(data_dir):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))
    opt = run(mlp(), X_BIG())
    assert not sites(opt, "rewritten")
    assert "needs a CUDA GPU of compute capability 8.9" in sites(opt)["up"].reason
    assert "weights are on cpu" in sites(opt)["up"].reason


@pytest.mark.parametrize("capability, ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_compute_capability(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = fp8.fp8_device_support(torch.device("cuda", 0))
    if ok:
        assert reason is None
    else:
        assert f"this GPU has {capability[0]}.{capability[1]}" in reason


def test_sqnr_floor_rolls_back_a_bad_conversion(data_dir, fp8_on_cpu, monkeypatch):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))

    def garbage(linear, weight_only=False):
        bad = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None).to(BF16)
        return bad.eval()

    monkeypatch.setattr(fp8, "to_fp8", garbage)
    opt = run(mlp(), X_BIG())
    skipped = sites(opt, "skipped")
    assert set(skipped) == {"up", "down"}
    assert "under the 20 dB floor (Config.min_sqnr_db['fp8'])" in skipped["up"].reason
    assert skipped["up"].checks["sqnr_db"] < 5
    assert type(opt.model.up.weight) is nn.Parameter


def test_sqnr_floor_is_the_configs(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))
    opt = run(mlp(), X_BIG(), min_sqnr_db={"fp8": 80.0})  # real FP8 reaches ~30 dB: rolled back
    assert not sites(opt, "rewritten")
    assert "under the 80 dB floor" in sites(opt)["up"].reason


def test_weight_only_where_it_is_the_faster_variant(data_dir, fp8_on_cpu):
    from torchao.quantization import Float8Tensor

    write_linear_table(data_dir, table_for([(64, 128), (128, 64)], fp8_at=lambda m: 3.0, others={"fp8_wo": 0.8}))
    opt = run(mlp(), X_SMALL())
    done = sites(opt, "rewritten")
    assert set(done) == {"up", "down"}
    assert done["up"].target == "fp8_wo" and "fp8 weight-only" in done["up"].detail
    assert isinstance(opt.model.up.weight, Float8Tensor)
    assert done["up"].checks["sqnr_db"] > 20


def test_fp16_weights_only_consider_weight_only(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))  # dynamic FP8 pays, no weight-only column
    torch.manual_seed(0)
    model = MLP().half().eval()
    opt = run(model, torch.randn(4, 256, 64, dtype=torch.float16))
    assert not sites(opt, "rewritten")
    assert "no FP8 times" in sites(opt)["up"].reason


class Twice(nn.Module):
    """One linear called twice: with all rows and with 16 of them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x) + self.lin(x[:1, :16]).mean()


@pytest.mark.parametrize("big, small, converts", [(0.5, 2.0, False), (0.2, 1.5, True)])
def test_one_site_per_module_judged_on_all_its_calls(data_dir, fp8_on_cpu, big, small, converts):
    write_linear_table(data_dir, table_for([(64, 64)], fp8_at=lambda m: big if m >= 1024 else small))
    torch.manual_seed(0)
    opt = run(Twice().to(BF16).eval(), X_BIG())
    (site,) = sites(opt).values()
    assert site.detail.startswith("M 1024, K 64, N 64, 2 calls")
    assert site.est_speedup == round(2.0 / (big + small), 2)  # bf16 1 ms per call, both calls counted
    assert site.rewritten == converts
    if converts:
        assert site.est_saved_ms == pytest.approx(2.0 - big - small)
    else:
        assert "0.80x at M 1024, K 64, N 64, 2 calls" in site.reason


def test_left_to_sparse24_where_2_4_is_predicted_faster(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)], others={"sparse24": 0.4}))
    opt = run(mlp(), X_BIG(), mode="max")
    assert "left to pass sparse24" in sites(opt)["up"].reason
    opt = run(mlp(), X_BIG(), mode="fast")  # sparse24 does not run in "fast": FP8 takes it
    assert set(sites(opt, "rewritten")) == {"up", "down"}


class LookAlikes(nn.Module):
    """Products with a weight that the FP8 pass must not convert, each for its own reason."""

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    def __init__(self):
        super().__init__()
        self.sub = self.MyLinear(64, 64)
        self.shared = nn.Linear(64, 64)  # its weight is also read directly by the parent
        self.bare = nn.Parameter(torch.randn(64, 64))  # x @ W.T with a parameter of the top module
        self.narrow = nn.Linear(64, 40)  # N not a multiple of 16
        self.wide = nn.Linear(64, 64)  # an ordinary nn.Linear: the one that converts

    def forward(self, x):
        y = self.sub(x) + self.shared(x) + F.linear(x, self.shared.weight) + x @ self.bare.t()
        return self.wide(y), self.narrow(y)


def test_look_alikes_left_alone(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 64), (64, 40)]))
    torch.manual_seed(0)
    opt = run(LookAlikes().to(BF16).eval(), X_BIG())
    found = sites(opt)
    assert found["wide"].status == "rewritten"
    assert "MyLinear, not an nn.Linear" in found["sub"].reason
    assert "also used outside nn.Linear.forward" in found["shared"].reason
    assert "belongs to a LookAlikes" in found[""].reason
    assert "multiples of 16" in found["narrow"].reason
    assert sum(s.status == "rewritten" for s in found.values()) == 1


def test_fp32_and_training_mode_left_alone(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))
    torch.manual_seed(0)
    opt = run(MLP().eval(), torch.randn(4, 256, 64))
    assert "weights are torch.float32" in sites(opt)["up"].reason
    opt = run(mlp().train(), X_BIG())
    assert "training mode" in sites(opt)["up"].reason and not sites(opt, "rewritten")


def test_not_run_in_exact_mode(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))
    assert "fp8" not in rewriter.Config(mode="exact").active_passes()
    assert "fp8" in rewriter.Config(mode="fast").active_passes()
    assert "fp8" in rewriter.Config(mode="max").active_passes()
    assert "fp8" not in rewriter.Config(mode="fast", disable=("fp8",)).active_passes()
    opt = run(mlp(), X_BIG(), mode="exact")
    assert not sites(opt)
    with pytest.raises(ValueError, match="lossy"):
        rewriter.Config(mode="exact", enable=("fp8",))


def test_outside_config_modules(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))
    opt = run(mlp(), X_BIG(), modules=r"^down$")
    assert set(sites(opt, "rewritten")) == {"down"}
    assert sites(opt)["up"].reason == "outside Config.modules"


def test_state_dict_round_trip(data_dir, fp8_on_cpu):
    write_linear_table(data_dir, table_for([(64, 128), (128, 64)]))
    x = X_BIG()
    a = run(mlp(0), x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # torchao registers Float8Tensor as a safe global
    b = run(mlp(1), x)  # other weights, optimized the same way
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(state)
        assert torch.equal(a(x), b(x))
    with pytest.raises(RuntimeError):  # a Float8Tensor does not load into a plain bf16 parameter
        mlp(2).load_state_dict(state)


def test_convert_linears_forces_every_linear(fp8_on_cpu):
    from torchao.quantization import Float8Tensor

    model = mlp()
    done = fp8.convert_linears(model, lambda m, path: path != "down")
    assert done == ["up"]
    assert isinstance(model.up.weight, Float8Tensor) and type(model.down.weight) is nn.Parameter


# ---- on a GPU -------------------------------------------------------------------------------------


def _fp8_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU of compute capability 8.9 or newer")


@pytest.mark.gpu
@pytest.mark.parametrize("inductor", [False, True])
def test_gpu_converts_and_matches(data_dir, inductor):
    _fp8_gpu()
    from torchao.quantization import Float8Tensor

    write_linear_table(data_dir, table_for([(256, 512), (512, 256)]))
    torch.manual_seed(0)
    model = MLP(256, 512).to("cuda", BF16).eval()
    x = torch.randn(4, 256, 256, device="cuda", dtype=BF16)
    opt = run(model, x, inductor=inductor)
    done = sites(opt, "rewritten")
    assert set(done) == {"up", "down"}, str(opt.report)
    assert isinstance(opt.model.up.weight, Float8Tensor)
    assert all(s.checks["sqnr_db"] > 22 for s in done.values())  # e4m3 on both operands: ~28-30 dB
    assert not any("Inductor could not compile" in n for n in opt.report.notes), opt.report.notes
    with torch.no_grad():
        assert sqnr_db(model(x), opt(x)) > 20


@pytest.mark.gpu
def test_gpu_state_dict_round_trip(data_dir):
    _fp8_gpu()
    write_linear_table(data_dir, table_for([(256, 512), (512, 256)]))
    x = torch.randn(4, 256, 256, device="cuda", dtype=BF16)
    make = lambda seed: (torch.manual_seed(seed), MLP(256, 512).to("cuda", BF16).eval())[1]
    a = run(make(0), x, inductor=True)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = run(make(1), x, inductor=True)
    with torch.no_grad():
        b.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(a(x), b(x))

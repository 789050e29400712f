"""The 2:4 sparsity pass: pruning keeps the right 2 of every 4, the measured table decides, SQNR is
reported (and gates only on request), and the state dict stays an ordinary dense one.

Semi-structured sparse tensors exist only on CUDA, so on the CPU the tests that convert replace
the compression step by the identity: the layer then multiplies by the pruned dense weight, which
is what the sparse kernel computes. The GPU tests at the end compress for real.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
import rewriter.passes.sparse24 as sp
from utils import write_linear_table
from rewriter.passes.sparse24 import Sparse24Linear, is_2_4, prune_2_4
from rewriter.validate import sqnr_db

BF16 = torch.bfloat16


# ---- pruning --------------------------------------------------------------------------------------


def test_pruning_keeps_exactly_two_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    for method, norm in (("magnitude", None), ("wanda", torch.rand(64) + 0.1)):
        p = prune_2_4(w, method, norm)
        groups = (p != 0).view(32, 16, 4).sum(-1)
        assert bool((groups == 2).all())
        kept = p != 0
        assert torch.equal(p[kept], w[kept])  # kept weights are unchanged
        assert is_2_4(p) and not is_2_4(w)


def test_magnitude_keeps_the_largest():
    w = torch.tensor([[4.0, -1.0, 3.0, 2.0, -5.0, 0.1, 0.2, 5.0]])
    assert prune_2_4(w).tolist() == [[4.0, 0.0, 3.0, 0.0, -5.0, 0.0, 0.0, 5.0]]


def test_wanda_weighs_by_the_input_norm():
    w = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
    norm = torch.tensor([0.1, 10.0, 1.0, 1.0])  # scores 0.3, 10, 2, 0.5
    assert prune_2_4(w, "magnitude").tolist() == [[3.0, 0.0, 2.0, 0.0]]
    assert prune_2_4(w, "wanda", norm).tolist() == [[0.0, 1.0, 2.0, 0.0]]


def test_pruning_keeps_dtype_and_leaves_the_input_alone():
    w = torch.randn(8, 16, dtype=BF16)
    before = w.clone()
    p = prune_2_4(w)
    assert p.dtype == BF16 and torch.equal(w, before)


def test_pruning_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_2_4(torch.randn(4, 6))
    with pytest.raises(ValueError, match="act_norm"):
        prune_2_4(torch.randn(4, 8), "wanda")
    with pytest.raises(ValueError, match="act_norm"):
        prune_2_4(torch.randn(4, 8), "wanda", torch.ones(4))
    with pytest.raises(ValueError, match="method"):
        prune_2_4(torch.randn(4, 8), "random")


# ---- the pass ---------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def write_table(directory, shapes, sparse_at=lambda m: 0.5):
    """A synthetic H200 table: bf16 1 ms everywhere, 2:4 ``sparse_at(M)`` ms, M in 1, 16, 1024."""
    write_linear_table(directory, [(m, k, n, {"bf16": 1.0, "sparse24": sparse_at(m)}) for k, n in shapes for m in (1, 16, 1024)])


@pytest.fixture
def sparse_on_cpu(monkeypatch):
    """Let the pass convert on the CPU: device check passes, compression keeps the dense pruned weight."""
    monkeypatch.setattr(sp, "sparse24_device_support", lambda device: None)
    monkeypatch.setattr(sp, "_compress", lambda weight: weight.contiguous())


def run(model, x, **config):
    config.setdefault("mode", "max")
    config.setdefault("device", "H200")
    config.setdefault("inductor", False)
    config.setdefault("disable", ("fp8",))
    return rewriter.optimize(model, (x,), config=rewriter.Config(**config))


def sites(opt, status=None):
    return {s.where: s for s in opt.report.sites
            if s.pass_name == "sparse24" and (status is None or s.status == status)}


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().to(BF16).eval()


X = lambda m=1024: torch.randn(m // 16, 16, 64, dtype=BF16)
SHAPES = [(64, 128), (128, 64)]


def test_converts_where_the_table_says_it_pays(data_dir, sparse_on_cpu):
    write_table(data_dir, SHAPES)
    model, x = mlp(), X()
    original = model.up.weight.detach().clone()
    opt = run(model, x)
    done = sites(opt, "rewritten")
    assert set(done) == {"up", "down"}, str(opt.report)
    up = done["up"]
    assert up.target == "sparse24" and up.detail.startswith("M 1024, K 64, N 128: 2:4 magnitude")
    assert up.est_speedup == 2.0 and up.est_saved_ms == 0.5
    assert 0 < up.checks["sqnr_db"] < 20  # half the weights gone: far from exact, and reported
    new = opt.model.up
    assert isinstance(new, Sparse24Linear)
    assert torch.equal(new.dense_weight(), prune_2_4(original))
    assert torch.equal(model.up.weight, original) and type(model.up) is nn.Linear  # the user's model
    with torch.no_grad():
        want = F.linear(F.gelu(F.linear(x, prune_2_4(original), model.up.bias)), prune_2_4(model.down.weight))
        assert torch.equal(opt(x), want)


def test_wanda_uses_the_example_activations(data_dir, sparse_on_cpu):
    write_table(data_dir, SHAPES)
    model = mlp()
    x = X() * torch.linspace(0.01, 4.0, 64, dtype=BF16)  # input features of very different sizes
    opt = run(model, x, sparse_method="wanda")
    norm = x.reshape(-1, 64).float().norm(dim=0)
    want = prune_2_4(model.up.weight, "wanda", norm)
    assert torch.equal(opt.model.up.dense_weight(), want)
    assert not torch.equal(want, prune_2_4(model.up.weight))  # the activations changed the choice
    assert "2:4 wanda" in sites(opt)["up"].detail


def test_left_alone_where_the_table_says_slower(data_dir, sparse_on_cpu):
    write_table(data_dir, SHAPES, sparse_at=lambda m: 0.5 if m >= 1024 else 4.0)
    opt = run(mlp(), X(16))
    skipped = sites(opt, "skipped")
    assert set(skipped) == {"up", "down"}
    assert "predicted 0.25x for 2:4 at M 16, K 64, N 128" in skipped["up"].reason
    assert type(opt.model.up) is nn.Linear


def test_skipped_without_a_table(data_dir, sparse_on_cpu):
    opt = run(mlp(), X())
    assert sites(opt)["up"].reason == "no measured throughput table for H200: run benchmarks/linear.py --table"


def test_skipped_on_cpu(data_dir):
    write_table(data_dir, SHAPES)
    opt = run(mlp(), X())
    assert not sites(opt, "rewritten")
    assert "needs a CUDA GPU of compute capability 8.0" in sites(opt)["up"].reason


@pytest.mark.parametrize("capability, ok", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_compute_capability(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = sp.sparse24_device_support(torch.device("cuda", 0))
    assert (reason is None) == ok
    if not ok:
        assert "this GPU has 7.5" in reason


@pytest.mark.parametrize("cusparselt, fragment", [(True, "cuSPARSELt takes N a multiple of 16"),
                                                   (False, "CUTLASS takes N a multiple of 32 and K a multiple of 64")])
def test_shapes_the_backend_rejects(data_dir, sparse_on_cpu, monkeypatch, cusparselt, fragment):
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 40)  # N=40: neither backend
            self.b = nn.Linear(64, 48)  # N=48: cuSPARSELt only

        def forward(self, x):
            return self.a(x), self.b(x)

    write_table(data_dir, [(64, 40), (64, 48)])
    torch.manual_seed(0)
    opt = run(Odd().to(BF16).eval(), X())
    assert fragment in sites(opt)["a"].reason and "N=40" in sites(opt)["a"].reason
    assert sites(opt)["b"].rewritten == cusparselt


def test_sqnr_reported_but_not_gated_by_default(data_dir, sparse_on_cpu, monkeypatch):
    write_table(data_dir, SHAPES)
    monkeypatch.setattr(sp, "to_sparse24", lambda linear, method, act_norm: Sparse24Linear(
        torch.randn_like(linear.weight), linear.bias))  # garbage
    opt = run(mlp(), X())
    done = sites(opt, "rewritten")
    assert set(done) == {"up", "down"} and done["up"].checks["sqnr_db"] < 3


def test_sqnr_floor_rolls_back_when_configured(data_dir, sparse_on_cpu):
    write_table(data_dir, SHAPES)
    opt = run(mlp(), X(), min_sqnr_db={"fp8": 20.0, "sparse24": 30.0})  # pruning reaches ~10 dB
    skipped = sites(opt, "skipped")
    assert set(skipped) == {"up", "down"}
    assert "under the 30 dB floor (Config.min_sqnr_db['sparse24']); left dense" in skipped["up"].reason
    assert type(opt.model.up) is nn.Linear
    opt = run(mlp(), X(), min_sqnr_db={"fp8": 20.0, "sparse24": 3.0})
    assert set(sites(opt, "rewritten")) == {"up", "down"}


class LookAlikes(nn.Module):
    class MyLinear(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        self.sub = self.MyLinear(64, 64)
        self.shared = nn.Linear(64, 64)  # also read directly by the parent
        self.plain = nn.Linear(64, 64)

    def forward(self, x):
        return self.plain(self.sub(x) + self.shared(x) + F.linear(x, self.shared.weight))


def test_look_alikes_left_alone(data_dir, sparse_on_cpu):
    write_table(data_dir, [(64, 64)])
    torch.manual_seed(0)
    opt = run(LookAlikes().to(BF16).eval(), X())
    found = sites(opt)
    assert found["plain"].rewritten
    assert "MyLinear, not an nn.Linear" in found["sub"].reason
    assert "also used outside nn.Linear.forward" in found["shared"].reason
    torch.manual_seed(0)
    opt = run(MLP().eval(), torch.randn(64, 16, 64))
    assert "weights are torch.float32" in sites(opt)["up"].reason
    opt = run(mlp().train(), X())
    assert "training mode" in sites(opt)["up"].reason


def test_modes():
    assert "sparse24" not in rewriter.Config(mode="exact").active_passes()
    assert "sparse24" not in rewriter.Config(mode="fast").active_passes()
    assert "sparse24" in rewriter.Config(mode="fast", enable=("sparse24",)).active_passes()
    assert "sparse24" in rewriter.Config(mode="max").active_passes()
    with pytest.raises(ValueError, match="lossy"):
        rewriter.Config(mode="exact", enable=("sparse24",))


def test_fp8_weights_are_not_pruned_again(data_dir, sparse_on_cpu, monkeypatch):
    import torchao.quantization.quant_api as quant_api

    import rewriter.passes.fp8 as fp8

    monkeypatch.setattr(fp8, "fp8_device_support", lambda device: None)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    rows = [{"M": m, "K": k, "N": n, "bf16_ms": 1.0, "fp8_ms": 0.4, "sparse24_ms": 0.5}
            for k, n in SHAPES for m in (1, 16, 1024)]
    (data_dir / "linear_h200.json").write_text(json.dumps({"device": "H200", "rows": rows}))
    opt = run(mlp(), X(), disable=())
    assert {s.where for s in opt.report.rewritten("fp8")} == {"up", "down"}
    assert "already a Float8Tensor" in sites(opt)["up"].reason


# ---- state ------------------------------------------------------------------------------------------


def test_state_dict_is_dense_and_round_trips(data_dir, sparse_on_cpu):
    write_table(data_dir, SHAPES)
    x = X()
    a = run(mlp(0), x)
    state = a.state_dict()
    assert type(state["up.weight"]) is torch.Tensor and is_2_4(state["up.weight"])
    assert torch.equal(state["up.weight"], a.model.up.dense_weight())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = run(mlp(1), x)
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(state)
        assert torch.equal(a(x), b(x))
        plain = mlp(2)
        plain.load_state_dict(state)  # the original architecture takes it too
        assert torch.equal(plain(x), a(x))


def test_loading_a_dense_weight_is_refused(data_dir, sparse_on_cpu):
    write_table(data_dir, SHAPES)
    a = run(mlp(0), X())
    with pytest.raises(RuntimeError, match="not 2:4 sparse"):
        a.load_state_dict(mlp(1).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        a.model.up.load_state_dict({"weight": torch.zeros(128, 32, dtype=BF16), "bias": torch.zeros(128, dtype=BF16)})
    with pytest.raises(RuntimeError, match="Missing key"):
        a.model.up.load_state_dict({"weight": a.model.up.dense_weight()})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        a.model.up.load_state_dict({**a.model.up.state_dict(), "scale": torch.ones(1)})


def test_convert_linears_forces_every_linear(sparse_on_cpu):
    model = mlp()
    assert sp.convert_linears(model, lambda m, path: path == "up") == ["up"]
    assert isinstance(model.up, Sparse24Linear) and type(model.down) is nn.Linear


# ---- on a GPU -------------------------------------------------------------------------------------


def _sparse_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer")


@pytest.mark.gpu
def test_gpu_semi_structured_matches_the_pruned_dense_linear():
    _sparse_gpu()
    torch.manual_seed(0)
    lin = nn.Linear(256, 512).to("cuda", BF16).eval()
    new = sp.to_sparse24(lin)
    assert type(new.weight) not in (torch.Tensor, nn.Parameter)  # really compressed
    assert torch.equal(new.dense_weight(), prune_2_4(lin.weight))
    for shape in ((64, 256), (3, 7, 256), (1, 256)):
        x = torch.randn(*shape, device="cuda", dtype=BF16)
        with torch.no_grad():
            want = F.linear(x.double(), prune_2_4(lin.weight).double(), lin.bias.double())
            ref = F.linear(x, prune_2_4(lin.weight), lin.bias)
            got = new(x)
        assert got.shape == ref.shape
        # same products on other tensor cores: within 2x of the dense bf16 error against float64
        assert (got.double() - want).norm() <= 2 * (ref.double() - want).norm() + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("inductor", [False, True])
def test_gpu_pass_converts_and_round_trips(data_dir, inductor):
    _sparse_gpu()
    write_table(data_dir, [(256, 512), (512, 256)])
    x = torch.randn(64, 16, 256, device="cuda", dtype=BF16)
    make = lambda seed: (torch.manual_seed(seed), MLP(256, 512).to("cuda", BF16).eval())[1]
    model = make(0)
    a = run(model, x, inductor=inductor)
    assert set(sites(a, "rewritten")) == {"up", "down"}, str(a.report)
    assert not any("Inductor could not compile" in n for n in a.report.notes), a.report.notes
    with torch.no_grad():
        want = F.linear(F.gelu(F.linear(x, prune_2_4(model.up.weight), model.up.bias)),
                        prune_2_4(model.down.weight))
        assert sqnr_db(want, a(x)) > 35  # the pruned function, up to bf16 rounding
    b = run(make(1), x, inductor=inductor)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    with torch.no_grad():
        b.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(a(x), b(x))

"""Sibling-linear fusion: Q/K/V and gate/up run as one GEMM on a weight concatenated once; outputs,
gradients and state dicts equal the unfused model's; every guard leaves its look-alike alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models as M
import rewriter
from rewriter.cost import LinearTable, device_spec, sibling_linear_estimate
from rewriter.passes import fuse_linear, fuse_linear_graph
from rewriter.passes.fuse_linear import FusedLinearWeights, LinearSlice
from utils import first, optimize, rel

X = lambda b=2, s=16, c=32: torch.randn(b, s, c)


class GatedMLP(nn.Module):
    """Llama-style MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def gemms(fn, *args, backward: bool = False) -> int:
    """How many matrix products (``mm``/``addmm``: the linears) one call of ``fn`` runs, as the
    profiler records them (compiled or not); with ``backward``, its backward's too. A first call,
    not counted, lets a compiled ``fn`` compile (and check its rewrites) for these inputs."""

    def call():
        with torch.set_grad_enabled(backward):
            out = fn(*args)
            if backward:
                out.sum().backward()

    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


def sites(opt, name):
    return [s for s in opt.report.sites if s.pass_name == name]


def unfused_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients under the unfused model's names (fused rows read back by slice)."""
    out = {}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, LinearSlice):
            for name, p in (("weight", m.fused.weight), ("bias", m.fused.bias)):
                if p is not None:
                    out[prefix + name] = p.grad.narrow(0, m.start, m.out_features).clone()
        elif not isinstance(m, FusedLinearWeights):
            out.update({prefix + name: p.grad.clone() for name, p in m.named_parameters(recurse=False)})
    return out


# ---- fires, exact ------------------------------------------------------------------------------

@pytest.mark.parametrize("make, siblings, n", [
    (M.Einsum, "q, k, v", "N 32+32+32"),
    (M.RepeatInterleaveGQA, "q, k, v", "N 32+16+16"),
    (GatedMLP, "gate, up", "N 64+64"),
])
def test_siblings_fused_into_one_gemm_and_exact(make, siblings, n):
    torch.manual_seed(0)
    model, x = make().eval(), X()
    opt = optimize(model, (x,))
    (mod,) = sites(opt, "fuse_linear")
    assert mod.rewritten and mod.detail.startswith(f"{siblings}: M 32, K 32, {n}"), mod.detail
    graph = sites(opt, "fuse_linear_graph")
    assert len(graph) == siblings.count(",") + 1 and all(s.rewritten for s in graph), str(opt.report)
    assert all(s.checks["validated"] for s in graph)
    if make is not GatedMLP:
        assert len(opt.report.rewritten("attention")) == 1  # attention is still found on the split views
    names = [p.strip() for p in siblings.split(",")]
    assert len({id(opt.model.get_submodule(p).fused) for p in names}) == 1
    with torch.no_grad():
        assert rel(opt(x), model(x)) <= 1e-5
    assert gemms(opt, x) == gemms(model, x) - len(names) + 1


@pytest.mark.parametrize("make, siblings, inductor", [(M.RepeatInterleaveGQA, 3, False), (GatedMLP, 2, False),
                                                      (M.Einsum, 3, True)])
def test_gradients_equal_unfused(make, siblings, inductor):
    """Fused in eval mode, then trained: gradients (read back per original weight) equal the unfused model's."""
    torch.manual_seed(0)
    model = make().eval()
    opt = optimize(model, (X(),), inductor=inductor)
    assert len(opt.report.rewritten("fuse_linear_graph")) == siblings
    model.train()
    opt.train()
    x, w = X(), None
    # forward and backward each run one GEMM (per gradient) for the group instead of one per sibling
    x_grad = x.clone().requires_grad_(True)
    assert gemms(opt, x_grad, backward=True) == gemms(model, x_grad, backward=True) - 3 * (siblings - 1)
    grads = []
    for fn, holder in ((opt, opt.model), (model, model)):
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)  # the unfused layers' parameters are shared by both
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        w = torch.randn_like(out) if w is None else w
        (out * w).sum().backward()
        g = unfused_grads(holder)
        g["input"] = xi.grad.clone()
        grads.append(g)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(dict(model.named_parameters())) + 1
    # Relative to each gradient's norm, floored at 1% of the typical one: the key bias gradient is
    # zero in exact arithmetic under softmax, only rounding remains there.
    floor = 1e-2 * sum(g.norm().item() for g in grads[1].values()) / len(grads[1])
    for name in grads[1]:
        err = (grads[0][name] - grads[1][name]).double().norm().item()
        assert err <= 1e-5 * max(grads[1][name].norm().item(), floor), name


def test_training_mode_is_not_fused():
    """A model optimized in training mode keeps its own weights: an optimizer built on them must
    keep training what the optimized model computes with."""
    model = M.Einsum().train()
    opt = optimize(model, (X(),))
    (site,) = sites(opt, "fuse_linear")
    assert not site.rewritten and "training mode" in site.reason
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}


# ---- state dict ------------------------------------------------------------------------------------

def test_state_dict_keys_and_values_equal_unfused():
    model = M.Einsum().eval()
    opt = optimize(model, (X(),))
    assert opt.report.rewritten("fuse_linear")
    want, got = model.state_dict(), opt.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not any(v.requires_grad for v in got.values())
    assert opt.state_dict(keep_vars=True)["q.weight"].requires_grad


def test_state_dict_loads_both_ways():
    torch.manual_seed(0)
    x = X()
    opt = optimize(M.Einsum().eval(), (x,))
    saved = {k: v.clone() for k, v in opt.state_dict().items()}
    fresh = optimize(M.Einsum().eval(), (x,))
    fresh.load_state_dict(saved)
    plain = M.Einsum().eval()
    plain.load_state_dict(saved)  # an optimized model's checkpoint is an ordinary one
    with torch.no_grad():
        assert rel(fresh(x), opt(x)) <= 1e-6
        assert rel(plain(x), opt(x)) <= 1e-5
    unfused = M.Einsum().eval()  # a checkpoint of the original model loads into the optimized one
    for assign in (False, True):
        fresh.load_state_dict(M.Einsum().state_dict())
        fresh.load_state_dict(unfused.state_dict(), assign=assign)
        with torch.no_grad():
            assert rel(fresh(x), unfused(x)) <= 1e-5
    assert gemms(fresh, x) == 2  # loading copied into the fused weight: q, k, v still run as one GEMM
    missing = {k: v for k, v in saved.items() if k != "k.bias"}
    with pytest.raises(RuntimeError, match='Missing key.*"k.bias"'):
        fresh.load_state_dict(missing)
    with pytest.raises(RuntimeError, match='Unexpected key.*"k.scale"'):
        fresh.load_state_dict({**saved, "k.scale": torch.ones(1)})
    with pytest.raises(RuntimeError, match="size mismatch for v.weight"):
        fresh.load_state_dict({**saved, "v.weight": torch.zeros(16, 32)})
    assert fresh.load_state_dict(missing, strict=False).missing_keys == ["k.bias"]


def test_optimizer_on_optimized_parameters_trains_fused_weights():
    """The fused weights are new parameters: an optimizer over the optimized model's parameters
    updates them (and the state dict shows it); the original model's weights stay as they were."""
    model = M.Einsum().eval()
    opt = optimize(model, (X(),))
    opt.train()
    q0 = model.q.weight.detach().clone()
    sgd = torch.optim.SGD(opt.parameters(), lr=0.1)
    opt(X()).square().sum().backward()
    sgd.step()
    assert not torch.equal(opt.state_dict()["q.weight"], q0)
    assert torch.equal(model.q.weight, q0)
    assert torch.equal(opt.state_dict()["o.weight"], model.o.weight)  # unfused layers stay shared


def test_original_model_not_modified():
    model = M.Einsum().eval()
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    params = [(n, id(p)) for n, p in model.named_parameters()]
    values = {k: v.clone() for k, v in model.state_dict().items()}
    opt = optimize(model, (X(),))
    assert opt.report.rewritten("fuse_linear")
    assert [(n, id(m), type(m)) for n, m in model.named_modules()] == modules
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in values.items())
    assert type(opt.model.q) is LinearSlice and type(model.q) is nn.Linear


def test_inplace_swaps_the_models_own_modules():
    model = M.Einsum().eval()
    x = X()
    with torch.no_grad():
        want = model(x)
    opt = optimize(model, (x,), inplace=True)
    assert opt.model is model and type(model.q) is LinearSlice
    with torch.no_grad():
        assert rel(opt(x), want) <= 1e-5


# ---- left alone, with a reason --------------------------------------------------------------------

class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 16)
        self.b = nn.Linear(32, 16)


class DifferentInputs(_Pair):
    def forward(self, x, y):
        return self.a(x) + self.b(y)


class Autocast(_Pair):
    """Same input, weights of different dtypes (autocast runs both in bf16)."""

    def __init__(self):
        super().__init__()
        self.b.to(torch.bfloat16)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.a(x).float() + self.b(x).float()


class Frozen(_Pair):
    def __init__(self):
        super().__init__()
        self.b.requires_grad_(False)

    def forward(self, x):
        return self.a(x) * self.b(x)


class Tied(_Pair):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(32, 16)
        self.c.weight = self.b.weight

    def forward(self, x, y):
        return self.a(x) + self.b(x) + self.c(y)


class Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class Subclass(_Pair):
    def __init__(self):
        super().__init__()
        self.b = Scaled(32, 16)

    def forward(self, x):
        return self.a(x) - self.b(x)


class Hooked(_Pair):
    def __init__(self):
        super().__init__()
        self.b.register_forward_hook(lambda m, i, o: o * 3)

    def forward(self, x):
        return self.a(x) - self.b(x)


@pytest.mark.parametrize("make, reason", [
    (Autocast, "a: no sibling with the same dtype, device, bias and requires_grad; b: no sibling"),
    (Frozen, "a: no sibling with the same dtype, device, bias and requires_grad"),
    (Tied, "b: a parameter is shared with another module (tied)"),
    (Subclass, "b: the weight belongs to a Scaled, not an nn.Linear"),
    (Hooked, "b: the module has hooks, which a swapped module would lose"),
])
def test_siblings_that_cannot_share_a_weight_are_left_alone(make, reason):
    torch.manual_seed(0)
    model = make().eval()
    args = (X(), X()) if make is Tied else (X(),)
    opt = optimize(model, args)
    (site,) = sites(opt, "fuse_linear")
    assert site.status == "skipped" and site.reason.startswith(reason), site.reason
    assert not sites(opt, "fuse_linear_graph")
    assert type(opt.model.a) is nn.Linear
    with torch.no_grad():
        assert torch.equal(opt(*args), model(*args))


class GatedWithScalarGate(nn.Module):
    """Qwen2-MoE's shared expert: gate/up and a one-column gate of the expert, all on one input."""

    def __init__(self, dim=32, hidden=64, gate_n=1):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.expert_gate = nn.Linear(dim, gate_n, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        y = self.down(F.silu(self.gate(x)) * self.up(x))
        return torch.sigmoid(self.expert_gate(x))[..., :1] * y


@pytest.mark.parametrize("gate_n, fused", [(1, "gate, up"), (8, "gate, up, expert_gate")])
def test_a_member_that_would_misalign_the_fused_rows_runs_alone(gate_n, fused):
    # 64 + 64 + 1 = 129 columns: fp32 rows of 516 bytes, off 16-byte boundaries; gate and up are
    # fused without it. A one-column member that keeps the rows aligned (8: 136 columns) joins.
    torch.manual_seed(0)
    model, x = GatedWithScalarGate(gate_n=gate_n).eval(), X()
    opt = optimize(model, (x,))
    (mod,) = sites(opt, "fuse_linear")
    assert mod.rewritten and mod.detail.startswith(f"{fused}: M 32, K 32"), mod.detail
    if gate_n == 1:
        assert "expert_gate: N 1 would leave the fused output's rows off 16-byte boundaries" in mod.detail
        assert type(opt.model.expert_gate) is nn.Linear
    with torch.no_grad():
        assert rel(opt(x), model(x)) <= 1e-5


def test_different_inputs_are_not_siblings():
    opt = optimize(DifferentInputs().eval(), (X(), X()))
    assert not sites(opt, "fuse_linear") and not sites(opt, "fuse_linear_graph")


def test_cross_attention_fuses_only_keys_and_values():
    model = M.CrossAttention().eval()
    x, ctx = X(2, 16), X(2, 24)
    opt = optimize(model, (x, ctx))
    (site,) = opt.report.rewritten("fuse_linear")
    assert site.detail.startswith("k, v: M 48"), site.detail
    assert type(opt.model.q) is nn.Linear and opt.model.k.fused is opt.model.v.fused
    assert len(opt.report.rewritten("attention")) == 1
    with torch.no_grad():
        assert rel(opt(x, ctx), model(x, ctx)) <= 1e-5


class ViewedFlat(_Pair):
    def forward(self, x):
        return self.a(x).view(-1) + self.b(x).view(-1)  # needs the output contiguous


class InPlace(_Pair):
    def forward(self, x):
        a = self.a(x)
        a.mul_(2)
        return a + self.b(x)


class Returned(_Pair):
    def forward(self, x):
        a = self.a(x)
        return torch.relu(a) + self.b(x), a


@pytest.mark.parametrize("make, reason", [
    (ViewedFlat, "view at test_fuse_linear.py"),
    (InPlace, "mul_ at test_fuse_linear.py"),
    (Returned, "leaves the graph"),
])
def test_outputs_that_need_their_own_layout_keep_their_own_gemm(make, reason):
    torch.manual_seed(0)
    model, x = make().eval(), X()
    opt = optimize(model, (x,))
    graph = sites(opt, "fuse_linear_graph")
    assert [s.where for s in graph] == ["a", "b"] and all(s.status == "skipped" for s in graph)
    assert reason in graph[0].reason, graph[0].reason
    assert gemms(opt, x) == gemms(model, x) == 2
    with torch.no_grad():
        for got, want in zip(*(o if isinstance(o, tuple) else (o,) for o in (opt(x), model(x)))):
            assert rel(got, want) <= 1e-6


def test_modules_filter():
    opt = optimize(GatedMLP().eval(), (X(),), modules=r"^(up|down)$")
    (site,) = sites(opt, "fuse_linear")
    assert site.status == "skipped" and site.reason.startswith("gate: outside Config.modules")


def test_disabled_by_name():
    opt = optimize(GatedMLP().eval(), (X(),), disable=("fuse_linear",))
    assert not sites(opt, "fuse_linear") and not sites(opt, "fuse_linear_graph")


# ---- cost model -----------------------------------------------------------------------------------

def _table(fused_ms: float) -> LinearTable:
    rows = [{"M": m, "K": 32, "N": n, "bf16_ms": t} for m in (1, 4096) for n, t in ((32, 0.01), (96, fused_ms))]
    return LinearTable("H100", rows, "synthetic")


@pytest.mark.parametrize("fused_ms, fused", [(0.05, False), (0.015, True)])
def test_measured_table_decides(monkeypatch, fused_ms, fused):
    table = _table(fused_ms)
    monkeypatch.setattr(fuse_linear, "linear_table", lambda spec: table)
    monkeypatch.setattr(fuse_linear_graph, "linear_table", lambda spec: table)
    torch.manual_seed(0)
    model, x = M.Einsum().to(torch.bfloat16).eval(), X().to(torch.bfloat16)
    opt = optimize(model, (x,), device="H100")
    (site,) = sites(opt, "fuse_linear")
    if fused:
        assert site.rewritten and "measured table synthetic" in site.detail, site.detail
        graph = sites(opt, "fuse_linear_graph")
        assert all(s.rewritten and s.est_speedup == 2.0 for s in graph) and len(graph) == 3
    else:
        assert site.status == "skipped" and site.est_speedup == 0.6
        assert site.reason == ("the cost model predicts no gain: one GEMM 0.05 ms against 0.03 ms for the parts "
                               "(measured table synthetic)")
        assert not sites(opt, "fuse_linear_graph") and type(opt.model.q) is nn.Linear


@pytest.mark.parametrize("rows, k, ns", [(1, 4096, [4096, 1024, 1024]), (8192, 4096, [14336, 14336]),
                                         (16, 64, [64, 64])])
def test_without_a_table_one_gemm_never_costs_more(rows, k, ns):
    est, source = sibling_linear_estimate(device_spec("H100"), None, rows, k, ns, torch.bfloat16, bias=False)
    assert est.speedup > 1.0 and source.startswith("roofline")
    assert est.flops_after == est.flops_before and est.bytes_after < est.bytes_before


# ---- the graph pass on its own, and transformers ----------------------------------------------------

class Slices(nn.Module):
    """Row slices of one weight written by hand: ``[:16]``/``narrow`` adjacent, ``[44:48]`` after a gap."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(48, 32))

    def forward(self, x):
        a = F.linear(x, self.w[:16])
        b = F.linear(x, self.w.narrow(0, 16, 24))
        c = F.linear(x, self.w[44:48])
        return a.sum(-1) + b.sum(-1) + c.sum(-1)


def test_graph_pass_fuses_adjacent_slices_of_one_weight():
    torch.manual_seed(0)
    model, x = Slices().eval(), X()
    be = rewriter.backend(rewriter.Config(inductor=False))
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        assert rel(compiled(x), model(x)) <= 1e-5
    graph = [s for s in be.report.sites if s.pass_name == "fuse_linear_graph"]
    assert [s.status for s in graph] == ["rewritten", "rewritten"]  # the slice after a gap keeps its own
    assert "N 16+24 -> one GEMM of N 40" in graph[0].detail


def test_tiny_llama_fused_exact_and_saved_by_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModel

    from rewriter.targets import hf_model

    torch.manual_seed(0)
    model = hf_model("llama", layers=1, hidden=64, heads=4, vocab=128, num_key_value_heads=2).eval()
    ids = torch.randint(0, 128, (2, 12))
    kw = {"use_cache": False}
    opt = optimize(model, (ids,), kw)
    assert [(s.where, s.detail.split(":")[0]) for s in opt.report.rewritten("fuse_linear")] == [
        ("layers.0.self_attn", "q_proj, k_proj, v_proj"), ("layers.0.mlp", "gate_proj, up_proj")]
    assert len(opt.report.rewritten("fuse_linear_graph")) == 5
    assert len(opt.report.rewritten("attention")) == 1
    with torch.no_grad():
        assert rel(first(opt(ids, **kw)), first(model(ids, **kw))) <= 1e-5
    assert list(opt.state_dict()) == list(model.state_dict())
    opt.model.save_pretrained(tmp_path)  # safetensors, under the original names
    again = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(first(again(ids, **kw)), first(model(ids, **kw)))

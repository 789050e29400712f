"""Trust: wrong rewrites are caught and rolled back, failures never break the model, bad input gets
a clear error, inputs after optimization are handled, and the user's model and state are left as
they were."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import models as M
import rewriter
from rewriter.passes import register_pass, unregister_pass
from rewriter.passes.attention import AttentionPass
from utils import optimize, rel

X = lambda b=2, s=16, c=32: torch.randn(b, s, c)


# ---- 1. validation and rollback -------------------------------------------------------------

class PlantedWrongScale(AttentionPass):
    """Test-only: rewrites attention with the scale off by 0.2%, a subtle error."""

    name = "planted_wrong_scale"

    def _rewrite(self, ctx, m, plan, detail, *choice):
        plan.scale *= 1.002
        return super()._rewrite(ctx, m, plan, detail, *choice)


@pytest.fixture
def planted():
    register_pass(PlantedWrongScale, before="attention")
    yield
    unregister_pass(PlantedWrongScale.name)


def test_planted_wrong_rewrite_is_caught_and_rolled_back(planted):
    model = M.NanoGPT().eval()
    x = X()
    opt = optimize(model, (x,))
    (bad,) = opt.report.sites[:1]
    assert bad.pass_name == "planted_wrong_scale" and bad.status == "skipped"
    assert "validation failed" in bad.reason and bad.checks["max_rel_err"] > 1e-5
    # the correct pass then rewrote the site, and the model matches eager
    assert len(opt.report.rewritten("attention")) == 1
    with torch.no_grad():
        assert rel(opt(x), model(x)) <= 1e-5


def test_planted_wrong_rewrite_applies_without_validation(planted):
    """The check is what catches it: with validation off the wrong rewrite goes through."""
    model = M.NanoGPT().eval()
    x = X()
    opt = optimize(model, (x,), validate=False)
    assert opt.report.rewritten("planted_wrong_scale")
    with torch.no_grad():
        assert rel(opt(x), model(x)) > 1e-5


# ---- 2. fallback --------------------------------------------------------------------------------

class Exploding(AttentionPass):
    """Test-only: rewrites every site, then raises."""

    name = "exploding"

    def run(self, ctx):
        super().run(ctx)
        raise RuntimeError("boom")


class Corrupting(AttentionPass):
    """Test-only: leaves a node that reads an erased node (the graph no longer lints)."""

    name = "corrupting"

    def run(self, ctx):
        out = next(n for n in ctx.graph.nodes if n.op == "output")
        with ctx.graph.inserting_before(out):
            dangling = ctx.graph.call_function(torch.relu, (out.args[0][0],))
        ctx.graph.erase_node(dangling)
        ctx.graph.call_function(torch.neg, (dangling,))


@pytest.mark.parametrize("cls", [Exploding, Corrupting])
def test_failing_pass_is_undone_and_reported(cls):
    register_pass(cls, before="attention")
    try:
        model = M.Timm().eval()
        x = X()
        opt = optimize(model, (x,))
        runs = [r for r in opt.report.passes if r.name == cls.name]
        assert runs and runs[0].status == "error"
        assert all(not s.rewritten for s in opt.report.sites if s.pass_name == cls.name)
        assert len(opt.report.rewritten("attention")) == 1  # the next pass still ran
        assert "failed on graph" in str(opt.report)
        with torch.no_grad():
            assert rel(opt(x), model(x)) <= 1e-5
    finally:
        unregister_pass(cls.name)


class GraphBreak(nn.Module):
    """Two attention blocks with data-dependent control flow and a print between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = M.Timm(), M.NanoGPT()

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:  # data-dependent: Dynamo breaks the graph here
            x = x * 2
        print("", end="")
        return self.b(x)


def test_graph_breaks_each_piece_rewritten():
    model = GraphBreak().eval()
    x = X()
    opt = optimize(model, (x,))
    assert opt.report.graphs >= 2
    assert len(opt.report.rewritten("attention")) == 2
    for xx in (x, -x):  # both branches
        with torch.no_grad():
            assert rel(opt(xx), model(xx)) <= 1e-5


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = M.Timm()

    def forward(self, x):
        y = self.a(x)
        return y + torch.from_numpy(y.detach().numpy().copy())  # leaves the graph


def test_untraceable_code_runs():
    model = Untraceable().eval()
    x = X()
    opt = optimize(model, (x,))
    with torch.no_grad():
        assert rel(opt(x), model(x)) <= 1e-5


def test_integer_model_left_alone():
    class Ints(nn.Module):
        def forward(self, a, b):
            return (a @ b.transpose(-1, -2)).float().softmax(-1)

    a = torch.randint(0, 5, (2, 4, 8))
    opt = optimize(Ints(), (a, a))
    assert not opt.report.rewritten()
    assert torch.equal(opt(a, a), Ints()(a, a))


# ---- invalid arguments: clear errors of standard types --------------------------------------------

def test_bad_arguments_raise_clear_errors():
    model = M.Timm()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rewriter.optimize(lambda x: x, (X(),))
    with pytest.raises(TypeError, match="do not match Timm.forward"):
        rewriter.optimize(model, (X(), X()))
    with pytest.raises(TypeError, match="example_kwargs"):
        rewriter.optimize(model, (X(),), example_kwargs=[1])
    with pytest.raises(TypeError, match="rewriter.Config"):
        rewriter.optimize(model, (X(),), config={"mode": "exact"})
    with pytest.raises(ValueError, match="unknown pass 'flash'"):
        rewriter.Config(disable=("flash",))
    with pytest.raises(ValueError, match="mode"):
        rewriter.Config(mode="turbo")
    with pytest.raises(TypeError, match="mode"):
        rewriter.Config(mode=3)
    with pytest.raises(TypeError, match="validate"):
        rewriter.Config(validate="yes")
    with pytest.raises(ValueError, match="regular expression"):
        rewriter.Config(modules="(")
    with pytest.raises(ValueError, match="attention_backend"):
        rewriter.Config(attention_backend="cudnn")
    with pytest.raises(ValueError, match="min_sqnr_db"):
        rewriter.Config(min_sqnr_db={"fp8": float("nan")})


def test_model_error_on_example_inputs_is_the_models_own():
    model = M.Timm()
    with pytest.raises(RuntimeError):
        rewriter.optimize(model, (torch.randn(2, 16, 7),), config=rewriter.Config(inductor=False))


# ---- 3. inputs after optimization ----------------------------------------------------------

def test_other_batch_and_sequence_lengths_are_respecialized():
    model = M.NanoGPT().eval()
    opt = optimize(model, (X(2, 16),))
    for b, s in [(3, 16), (2, 9), (1, 40), (5, 1)]:
        x = X(b, s)
        with torch.no_grad():
            assert rel(opt(x), model(x)) <= 1e-5, (b, s)
    assert opt.report.graphs > 1
    # every graph was rewritten for its own shape
    assert all(s.rewritten for s in opt.report.sites)


def test_other_dtype_is_respecialized():
    class Pure(nn.Module):  # no parameters: any dtype works
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v

    q = torch.randn(2, 3, 8, 16)
    opt = optimize(Pure(), (q, q, q))
    q64 = q.double()
    assert rel(opt(q64, q64, q64), Pure()(q64, q64, q64)) <= 1e-10
    assert opt(q64, q64, q64).dtype == torch.float64


def test_wrong_dtype_for_weights_fails_like_eager():
    model = M.Timm().eval()
    opt = optimize(model, (X(),))
    with pytest.raises(RuntimeError):
        model(X().double())
    with pytest.raises(RuntimeError):
        opt(X().double())


def test_non_contiguous_and_channels_last_inputs():
    model = M.Timm().eval()
    opt = optimize(model, (X(),))
    x = torch.randn(2, 32, 16).transpose(1, 2)  # non-contiguous (2, 16, 32)
    with torch.no_grad():
        assert rel(opt(x), model(x)) <= 1e-5

    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 4, stride=4)
            self.attn = M.Timm()

        def forward(self, img):
            return self.attn(self.stem(img).flatten(2).transpose(1, 2))

    net = Patches().eval()
    img = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    opt = optimize(net, (img,))
    assert opt.report.rewritten()
    with torch.no_grad():
        assert rel(opt(img), net(img)) <= 1e-5


def test_nan_and_inf_propagate_as_in_eager():
    model = M.NanoGPT().eval()
    opt = optimize(model, (X(),))
    for bad in (float("nan"), float("inf")):
        x = X()
        x[1, 5, 3] = bad
        with torch.no_grad():
            got, want = opt(x), model(x)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        finite = torch.isfinite(want)
        assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)
    assert torch.isnan(want).any()


def test_empty_batch():
    model = M.NanoGPT().eval()
    opt = optimize(model, (X(),))
    x = X(0, 16)
    with torch.no_grad():
        got = opt(x)
    assert got.shape == (0, 16, 32)


def test_inputs_that_require_grad():
    model = M.Timm().eval()
    opt = optimize(model, (X(),))
    x1 = X().requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    opt(x1).square().sum().backward()
    model(x2).square().sum().backward()
    assert rel(x1.grad, x2.grad) <= 1e-5


# ---- 4. the user's state ---------------------------------------------------------------------

class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(16)
        self.attn = M.Dropout(p=0.5)

    def forward(self, x):
        return self.attn(self.norm(x))


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [id(p) for p in model.parameters()], [id(m) for m in model.modules()],
            [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()])


def test_original_model_unchanged_by_optimize():
    model = WithState().train()
    model.norm.register_forward_hook(lambda *a: None)
    x = X()
    before = snapshot(model)
    rng = torch.random.get_rng_state()
    optimize(model, (x,))
    after = snapshot(model)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k  # batch-norm statistics included
    assert before[1:] == after[1:]
    assert torch.equal(rng, torch.random.get_rng_state())


def test_parameters_shared_and_optimizer_step_updates_original():
    model = M.Timm().eval()
    opt = optimize(model, (X(),))
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    w0 = model.qkv.weight.detach().clone()
    sgd = torch.optim.SGD(opt.parameters(), lr=0.1)
    opt(X()).sum().backward()
    sgd.step()
    assert not torch.equal(model.qkv.weight, w0)
    with torch.no_grad():  # and the optimized model sees the new weights
        x = X()
        assert rel(opt(x), model(x)) <= 1e-5


def test_state_dict_round_trip():
    model = M.NanoGPT().eval()
    opt = optimize(model, (X(),))
    sd = opt.state_dict()
    assert list(sd) == list(model.state_dict())
    other = M.NanoGPT().eval()
    fresh = optimize(other, (X(),))
    fresh.load_state_dict(sd)
    x = X()
    with torch.no_grad():
        assert rel(fresh(x), opt(x)) <= 1e-6


def test_train_and_eval_are_respected():
    model = M.Dropout(p=0.5).eval()
    opt = optimize(model, (X(),))
    x = X()
    with torch.no_grad():
        assert torch.equal(opt(x), opt(x))
        assert rel(opt(x), model(x)) <= 1e-5
    opt.train()
    assert opt.model.training and not model.training  # the original keeps its flag
    assert not torch.equal(opt(x), opt(x))  # dropout active
    opt.eval()
    with torch.no_grad():
        assert rel(opt(x), model(x)) <= 1e-5


def test_inplace_changes_the_model_object_only_when_asked():
    model = M.Timm().eval()
    opt = optimize(model, (X(),), inplace=True)
    assert opt.model is model
    opt2 = optimize(model, (X(),))
    assert opt2.model is not model and opt2.model.qkv.weight is model.qkv.weight

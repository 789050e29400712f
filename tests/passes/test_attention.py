"""The attention pass: every spelling is found, rewritten, and matches eager (forward, bf16, grads);
every look-alike is left alone with a reason."""

from __future__ import annotations

import pytest
import torch

import models as M
from utils import check_fp32, check_grads, check_low_precision, optimize, rel

torch.manual_seed(0)

X = lambda b=2, s=16, c=32: torch.randn(b, s, c)

# name -> (factory, args, expected detail fragments)
SPELLINGS = {
    "nanogpt": (lambda: M.NanoGPT(), lambda: (X(),), ["causal", "scale 0.3536"]),
    "timm": (lambda: M.Timm(), lambda: (X(),), ["no mask", "scale 0.3536"]),
    "einsum": (lambda: M.Einsum(), lambda: (X(),), ["no mask", "scale 0.3536"]),
    "bmm": (lambda: M.Bmm(), lambda: (X(),), ["no mask", "scale 0.3536", "8 heads"]),
    "baddbmm_bias": (lambda: M.Baddbmm(), lambda: (X(),), ["bias", "scale 0.3536"]),
    "repeat_interleave_gqa": (lambda: M.RepeatInterleaveGQA(), lambda: (X(),), ["causal", "GQA 2:1"]),
    "expand_reshape_gqa": (lambda: M.ExpandGQA(), lambda: (X(),), ["GQA 4:1"]),
    "cross_attention": (lambda: M.CrossAttention(), lambda: (X(2, 16), X(2, 24)), ["q 16 kv 24"]),
    "relative_position_bias": (lambda: M.RelPosBias(), lambda: (X(),), ["bias", "scale 1"]),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_found_rewritten_and_exact(name):
    make, args, fragments = SPELLINGS[name]
    _, sites = check_fp32(make(), args())
    for f in fragments:
        assert f in sites[0].detail, sites[0].detail
    assert sites[0].target == "sdpa"
    assert sites[0].checks["validated"] is True


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_bf16_within_eager_error(name):
    make, args, _ = SPELLINGS[name]
    check_low_precision(make(), args())


@pytest.mark.parametrize("name", ["nanogpt", "timm", "einsum", "bmm", "baddbmm_bias", "repeat_interleave_gqa",
                                  "cross_attention", "relative_position_bias"])
def test_spelling_gradients_match(name):
    make, args, _ = SPELLINGS[name]
    check_grads(make(), args())


def test_cross_attention_key_padding_mask_from_inputs():
    m = M.CrossAttention().eval()
    x, ctx = X(2, 16), X(2, 24)
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[1, 17:] = False
    _, sites = check_fp32(m, (x, ctx, keep))
    assert "from inputs" in sites[0].detail


def test_dropout_in_training_becomes_sdpa_dropout():
    m = M.Dropout(p=0.25).train()
    x = X()
    opt = optimize(m, (x,))
    (site,) = opt.report.rewritten("attention")
    assert "dropout 0.25" in site.detail
    # The rewritten graph calls SDPA with dropout_p=0.25: same RNG stream, same result as calling it.
    torch.manual_seed(1)
    got = opt(x)
    torch.manual_seed(1)
    q, k, v = m.split(x)
    want = m.merge(torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.25, scale=m.hd ** -0.5))
    assert rel(got, want) <= 1e-5
    # and dropout is really active: two calls differ
    assert rel(opt(x), opt(x)) > 1e-3


def test_dropout_in_eval_is_off():
    m = M.Dropout(p=0.25).eval()
    _, sites = check_fp32(m, (X(),))
    assert "dropout" not in sites[0].detail


def test_softcap_found_and_reported():
    opt = optimize(M.SoftCap(cap=5.0).eval(), (X(),))
    (site,) = [s for s in opt.report.sites if s.pass_name == "attention"]
    assert site.kind == "attention"
    assert "softcap 5" in site.detail
    with torch.no_grad():
        m = opt.model
        assert rel(opt(X()), m(X())) < 2  # runs


# ---- negative tests: look-alikes left alone, with a reason ---------------------------------------

@pytest.mark.parametrize("make, reason", [
    (M.SoftmaxOverQueries, "softmax is over axis -2"),
    (M.ScoresReused, "also used by"),
    (M.ZeroFill, "keeps the filled positions"),
    (M.ProbsReused, "probabilities"),
])
def test_lookalike_not_rewritten(make, reason):
    m = make().eval()
    x = X()
    opt = optimize(m, (x,))
    rep = opt.report
    assert not rep.rewritten("attention"), str(rep)
    (site,) = rep.skipped("attention")
    assert reason in site.reason, site.reason
    with torch.no_grad():
        got, want = opt(x), m(x)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b)


def test_plain_softmax_is_not_a_site():
    opt = optimize(M.Classifier().eval(), (X(),))
    assert [s for s in opt.report.sites if s.pass_name == "attention"] == []


def test_modules_filter_skips_sites_outside():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = M.Timm(), M.Timm()

        def forward(self, x):
            return self.b(self.a(x))

    opt = optimize(Two().eval(), (X(),), modules=r"^a$")
    assert [s.where for s in opt.report.rewritten()] == ["a"]
    assert [(s.where, s.reason) for s in opt.report.skipped()] == [("b", "outside Config.modules")]


def test_disable_attention_pass():
    opt = optimize(M.Timm().eval(), (X(),), disable=("attention",))
    assert [s for s in opt.report.sites if s.pass_name == "attention"] == []

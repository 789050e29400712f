"""The attention pass with the Triton kernel as a target: variants SDPA cannot express (soft-capping,
in-kernel windows, ALiBi, bottom-right causal) are rewritten to the kernel and match eager; the
choice per site follows the cost model. On CPU the kernel runs through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models as M
import rewriter.passes.attention as attention_pass
from rewriter.targets import hf_model
from utils import check_fp32, optimize, rel

pytest.importorskip("triton")

X = lambda b=2, s=16, c=32: torch.randn(b, s, c)


class BottomRight(nn.Module):
    """Decode-style block: 4 new queries attend to 12 cached keys, causal aligned bottom-right."""

    def forward(self, q, k, v):
        sq, skv = q.shape[-2], k.shape[-2]
        keep = torch.ones(sq, skv, dtype=torch.bool).tril(diagonal=skv - sq)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_softcap_forced_to_kernel_matches():
    _, sites = check_fp32(M.SoftCap(cap=5.0), (X(),), attention_backend="triton")
    assert sites[0].target == "triton" and "softcap 5" in sites[0].detail


def test_softcap_on_cpu_auto_is_left_with_reason():
    opt = optimize(M.SoftCap().eval(), (X(),))
    (site,) = [s for s in opt.report.sites if s.pass_name == "attention"]
    assert not site.rewritten and "CUDA" in site.reason


def test_bottom_right_causal_forced_to_kernel():
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 12, 16), torch.randn(2, 3, 12, 16)
    _, sites = check_fp32(BottomRight(), (q, k, v), attention_backend="triton")
    assert "causal (bottom-right)" in sites[0].detail


def test_bottom_right_causal_auto_on_cpu_keeps_a_mask_for_sdpa():
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 12, 16), torch.randn(2, 3, 12, 16)
    _, sites = check_fp32(BottomRight(), (q, k, v))
    assert sites[0].target == "sdpa"


def test_key_padding_with_softcap_forced_to_kernel():
    class PadCap(M.CrossAttention):
        def forward(self, x, ctx, keep):
            B, S, _ = x.shape
            T = ctx.shape[1]
            q = self.q(x).view(B, S, self.heads, self.hd).transpose(1, 2)
            k = self.k(ctx).view(B, T, self.heads, self.hd).transpose(1, 2)
            v = self.v(ctx).view(B, T, self.heads, self.hd).transpose(1, 2)
            s = 10.0 * torch.tanh(q @ k.transpose(-2, -1) * self.hd ** -0.5 / 10.0)
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
            return self.merge(s.softmax(-1) @ v)

    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[0, 20:] = False
    _, sites = check_fp32(PadCap(), (X(2, 16), X(2, 24), keep), attention_backend="triton")
    assert "key padding" in sites[0].detail


@pytest.mark.parametrize("kind, extra, fragments", [
    ("gemma2", dict(sliding_window=4, attn_logit_softcapping=20.0, num_key_value_heads=2, head_dim=16),
     ["softcap 20", "GQA 2:1"]),
    ("mistral", dict(sliding_window=5, num_key_value_heads=2), ["sliding window (left 4, right 0)"]),
    ("bloom", dict(), ["ALiBi + causal"]),
])
def test_transformers_variants_forced_to_kernel(kind, extra, fragments):
    torch.manual_seed(0)
    model = hf_model(kind, layers=2, hidden=64, heads=4, vocab=128, **extra).eval()
    ids = torch.randint(0, 128, (2, 12))
    _, sites = check_fp32(model, (ids,), {"use_cache": False}, n=2, attention_backend="triton")
    assert all(s.target == "triton" for s in sites)
    text = " ".join(s.detail for s in sites)
    for f in fragments:
        assert f in text, text


def test_cost_model_prefers_kernel_for_a_narrow_window(monkeypatch):
    """On a (simulated) H100 the kernel, which skips blocks outside the window, beats SDPA with a
    materialized mask; a plain causal site stays with SDPA's is_causal."""
    monkeypatch.setattr(attention_pass, "_on_cuda", lambda m: True)

    class Window(nn.Module):
        def forward(self, q, k, v):
            s = q.shape[-2]
            i = torch.arange(s)
            rel_pos = i[None, :] - i[:, None]
            w = (q @ k.transpose(-1, -2)) * 0.125
            w = w.masked_fill((rel_pos > 0) | (rel_pos < -8), float("-inf"))
            return w.softmax(-1) @ v

    q = torch.randn(1, 2, 128, 16)
    opt = optimize(Window(), (q, q, q), device="H100")
    (site,) = opt.report.rewritten()
    assert site.target == "triton" and "mask computed in the kernel" in site.detail
    assert rel(opt(q, q, q), Window()(q, q, q)) <= 1e-5
    opt = optimize(M.NanoGPT().eval(), (X(),), device="H100")
    assert opt.report.rewritten()[0].target == "sdpa"

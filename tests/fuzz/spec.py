"""Random models for fuzzing: attention, FFN and linear blocks in random spellings.

A model is a list of block specs (plain dicts, so a failing case prints as something one can paste
into a regression test). :func:`build` turns a spec into a module; :func:`model_specs` is the
hypothesis strategy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

PRODUCTS = ("at", "matmul", "einsum", "bmm", "baddbmm")
SCALES = ("mul_scores", "div_scores", "q_pre", "qk_pre", "full_tensor", "none")
MASKS = ("none", "tril_buffer", "where_min", "triu_add", "key_padding", "window", "bias_param", "alibi")
SOFTMAX = ("F", "torch", "method")


@st.composite
def attention_specs(draw, cross: bool | None = None):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    product = draw(st.sampled_from(PRODUCTS))
    cross = draw(st.booleans()) if cross is None else cross
    masks = ("none", "key_padding", "bias_param") if cross else MASKS
    return {
        "type": "attention",
        "heads": heads,
        "kv_heads": kv_heads,
        "gqa": draw(st.sampled_from(["repeat_interleave", "expand"])),
        "head_dim": draw(st.sampled_from([4, 8, 12])),
        "product": product,
        "scale": draw(st.sampled_from(SCALES)),
        "mask": draw(st.sampled_from(masks)),
        "window": draw(st.integers(1, 6)),
        "softmax": draw(st.sampled_from(SOFTMAX)),
        "upcast": draw(st.booleans()),
        "positive_dim": draw(st.booleans()),
        "dropout": draw(st.booleans()),
        "cross": cross,
        "pv_einsum_out": draw(st.booleans()),
    }


def block_specs():
    return st.one_of(
        attention_specs(),
        st.fixed_dictionaries({"type": st.just("ffn"), "gated": st.booleans()}),
        st.fixed_dictionaries({"type": st.just("linear")}),
        st.fixed_dictionaries({"type": st.just("norm")}),
    )


@st.composite
def model_specs(draw):
    blocks = draw(st.lists(block_specs(), min_size=1, max_size=4))
    if not any(b["type"] == "attention" for b in blocks):
        blocks.append(draw(attention_specs()))
    return {
        "blocks": blocks,
        "batch": draw(st.integers(1, 3)),
        "seq": draw(st.integers(1, 12)),
        "ctx": draw(st.integers(1, 10)),
        "dim": 24,
        "dtype": draw(st.sampled_from(["float32"] * 4 + ["bfloat16"])),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


class Attention(nn.Module):
    def __init__(self, spec: dict, dim: int, max_len: int = 64):
        super().__init__()
        self.s = spec
        h, hk, d = spec["heads"], spec["kv_heads"], spec["head_dim"]
        self.q = nn.Linear(dim, h * d)
        self.k = nn.Linear(dim, hk * d)
        self.v = nn.Linear(dim, hk * d)
        self.o = nn.Linear(h * d, dim)
        self.drop = nn.Dropout(0.3) if spec["dropout"] else nn.Identity()
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))
        self.bias = nn.Parameter(torch.randn(h, max_len, max_len) * 0.3)
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])
        self.register_buffer("slopes", slopes)

    def forward(self, x, ctx=None, keep=None):
        s = self.s
        B, S, _ = x.shape
        src = ctx if s["cross"] else x
        T = src.shape[1]
        h, hk, d = s["heads"], s["kv_heads"], s["head_dim"]
        q = self.q(x).view(B, S, h, d).transpose(1, 2)
        k = self.k(src).view(B, T, hk, d).transpose(1, 2)
        v = self.v(src).view(B, T, hk, d).transpose(1, 2)
        if hk != h:
            r = h // hk
            if s["gqa"] == "repeat_interleave":
                k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
            else:
                k = k[:, :, None].expand(B, hk, r, T, d).reshape(B, h, T, d)
                v = v[:, :, None].expand(B, hk, r, T, d).reshape(B, h, T, d)
        scale = d ** -0.5
        if s["scale"] == "q_pre":
            q = q * scale
        elif s["scale"] == "qk_pre":
            q, k = q * math.sqrt(scale), k * math.sqrt(scale)
        p = s["product"]
        three_d = p in ("bmm", "baddbmm")
        if three_d:
            q3, k3, v3 = q.reshape(B * h, S, d), k.reshape(B * h, T, d), v.reshape(B * h, T, d)
            if p == "bmm":
                w = torch.bmm(q3, k3.transpose(1, 2))
            else:
                w = torch.baddbmm(torch.zeros(B * h, S, T, dtype=q.dtype), q3, k3.transpose(1, 2), beta=0.0)
            w = w.view(B, h, S, T)
        elif p == "at":
            w = q @ k.transpose(-2, -1)
        elif p == "matmul":
            w = torch.matmul(q, k.transpose(2, 3))
        else:
            w = torch.einsum("bhqd,bhkd->bhqk", q, k)
        if s["scale"] == "mul_scores":
            w = w * scale
        elif s["scale"] == "div_scores":
            w = w / math.sqrt(d)
        elif s["scale"] == "full_tensor":
            w = w / torch.full([], math.sqrt(d), dtype=w.dtype, device=w.device)
        m = s["mask"]
        if m == "tril_buffer":
            w = w.masked_fill(self.tril[:, :, :S, :S] == 0, float("-inf"))
        elif m == "where_min":
            c = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            w = torch.where(c, w, torch.finfo(w.dtype).min)
        elif m == "triu_add":
            w = w + torch.triu(torch.full((S, S), float("-inf"), device=x.device), 1)
        elif m == "window":
            i = torch.arange(S, device=x.device)
            rel = i[None, :] - i[:, None]
            w = w.masked_fill((rel > 0) | (rel < -s["window"]), float("-inf"))
        elif m == "key_padding" and keep is not None:
            w = w.masked_fill(~keep[:, None, None, :T], float("-inf"))
        elif m == "bias_param":
            w = w + self.bias[:, :S, :T].to(w.dtype)
        elif m == "alibi":
            i = torch.arange(S, device=x.device)
            w = w + (self.slopes[:, None, None] * (i[None, :] - i[:, None])[None]).to(w.dtype)
        if s["upcast"]:
            w = w.float()
        dim = 3 if s["positive_dim"] else -1
        if s["softmax"] == "F":
            w = F.softmax(w, dim=dim)
        elif s["softmax"] == "torch":
            w = torch.softmax(w, dim)
        else:
            w = w.softmax(dim=dim)
        w = self.drop(w.to(q.dtype))
        if three_d:
            y = torch.bmm(w.reshape(B * h, S, T), v3).view(B, h, S, d).transpose(1, 2)
        elif s["pv_einsum_out"]:
            y = torch.einsum("bhqk,bhkd->bqhd", w, v)
        else:
            y = (w @ v).transpose(1, 2)
        return self.o(y.reshape(B, S, h * d))


class FFN(nn.Module):
    def __init__(self, dim: int, gated: bool):
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(dim, 2 * dim)
        self.gate = nn.Linear(dim, 2 * dim) if gated else None
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Model(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        dim = spec["dim"]
        self.kinds = [b["type"] for b in spec["blocks"]]
        self.cross = any(b["type"] == "attention" and b["cross"] for b in spec["blocks"])
        layers = []
        for b in spec["blocks"]:
            if b["type"] == "attention":
                layers.append(Attention(b, dim))
            elif b["type"] == "ffn":
                layers.append(FFN(dim, b["gated"]))
            elif b["type"] == "linear":
                layers.append(nn.Linear(dim, dim))
            else:
                layers.append(nn.LayerNorm(dim))
        self.layers = nn.ModuleList(layers)

    def forward(self, x, ctx, keep):
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "attention":
                x = x + layer(x, ctx, keep)
            elif kind == "norm":
                x = layer(x)
            else:
                x = x + layer(x)
        return x


def build(spec: dict):
    """(model, args, number of attention blocks) for a spec; weights and inputs from its seed."""
    g = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    model = Model(spec).eval()
    B, S, T, C = spec["batch"], spec["seq"], spec["ctx"], spec["dim"]
    x = torch.randn(B, S, C, generator=g)
    ctx = torch.randn(B, T, C, generator=g)
    keep = torch.rand(B, max(S, T), generator=g) > 0.3
    keep[:, 0] = True  # at least one key per row
    n_attn = sum(k == "attention" for k in model.kinds)
    return model, (x, ctx, keep), n_attn

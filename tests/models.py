"""Hand-written attention blocks in the spellings users write, shared by the tests.

Each takes ``x`` of shape (B, S, C) (cross-attention also takes ``ctx``) and returns (B, S, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _QKV(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=None, dropout=0.0):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.kv_heads = kv_heads or heads
        self.hd = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.kv_heads * self.hd)
        self.v = nn.Linear(dim, self.kv_heads * self.hd)
        self.o = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def split(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(B, S, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(x).view(B, S, self.kv_heads, self.hd).transpose(1, 2)
        return q, k, v

    def merge(self, y):
        B, H, S, D = y.shape
        return self.o(y.transpose(1, 2).reshape(B, S, H * D))


class NanoGPT(nn.Module):
    """nanoGPT: fused qkv, ``masked_fill`` with a registered ``tril`` buffer, ``* (1/sqrt(d))``."""

    def __init__(self, dim=32, heads=4, block=64, dropout=0.0):
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = heads, dim
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Timm(nn.Module):
    """timm ViT: ``q = q * scale`` before the product, ``.softmax(dim=-1)``, qkv via reshape/permute/unbind."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Einsum(_QKV):
    """``torch.einsum`` for both products, output straight into (B, S, H, D), key-padding ``masked_fill``."""

    def forward(self, x):
        q, k, v = self.split(x)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.hd)
        p = s.softmax(dim=-1)
        y = torch.einsum("bhqk,bhkd->bqhd", p, v)
        return self.o(y.reshape(x.shape[0], x.shape[1], -1))


class Bmm(_QKV):
    """``bmm`` over (B*H, S, D) reshapes, as older fairseq-style code does."""

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.split(x)
        q = q.reshape(B * self.heads, S, self.hd) * self.hd ** -0.5
        k = k.reshape(B * self.heads, S, self.hd)
        v = v.reshape(B * self.heads, S, self.hd)
        w = torch.bmm(q, k.transpose(1, 2))
        w = F.softmax(w.float(), dim=-1).type_as(w)
        y = torch.bmm(w, v)
        return self.merge(y.view(B, self.heads, S, self.hd))


class Baddbmm(_QKV):
    """``baddbmm`` adding a learned (H, S, S) bias in the same op (alpha = scale)."""

    def __init__(self, dim=32, heads=4, seq=16):
        super().__init__(dim, heads)
        self.rel = nn.Parameter(torch.randn(heads, seq, seq) * 0.5)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.split(x)
        q = q.reshape(B * self.heads, S, self.hd)
        k = k.reshape(B * self.heads, S, self.hd)
        v = v.reshape(B * self.heads, S, self.hd)
        bias = self.rel[:, :S, :S].repeat(B, 1, 1)
        w = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=self.hd ** -0.5)
        w = w.softmax(-1)
        y = torch.bmm(w, v)
        return self.merge(y.view(B, self.heads, S, self.hd))


class RepeatInterleaveGQA(_QKV):
    """GQA by ``repeat_interleave`` on the head axis, causal through ``is_causal``-free ``where``."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__(dim, heads, kv_heads)

    def forward(self, x):
        q, k, v = self.split(x)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        S = x.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        s = torch.matmul(q, k.transpose(2, 3)) * self.hd ** -0.5
        s = torch.where(causal, s, torch.finfo(s.dtype).min)
        return self.merge(torch.matmul(s.softmax(-1), v))


class ExpandGQA(_QKV):
    """GQA by ``[:, :, None].expand(...).reshape(...)`` (the transformers ``repeat_kv`` spelling)."""

    def __init__(self, dim=32, heads=4, kv_heads=1):
        super().__init__(dim, heads, kv_heads)

    def forward(self, x):
        q, k, v = self.split(x)
        B, Hk, S, D = k.shape
        rep = self.heads // Hk
        k = k[:, :, None, :, :].expand(B, Hk, rep, S, D).reshape(B, Hk * rep, S, D)
        v = v[:, :, None, :, :].expand(B, Hk, rep, S, D).reshape(B, Hk * rep, S, D)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        return self.merge(F.softmax(s, dim=-1) @ v)


class SoftCap(_QKV):
    """Gemma-2 style tanh soft-capping of the scores, then a causal mask."""

    def __init__(self, dim=32, heads=4, cap=5.0):
        super().__init__(dim, heads)
        self.cap = cap

    def forward(self, x):
        q, k, v = self.split(x)
        S = x.shape[1]
        s = q @ k.transpose(-1, -2) * self.hd ** -0.5
        s = torch.tanh(s / self.cap) * self.cap
        mask = torch.triu(torch.full((S, S), float("-inf"), device=x.device), diagonal=1)
        s = s + mask
        return self.merge(torch.softmax(s, dim=-1) @ v)


class CrossAttention(_QKV):
    """Queries from ``x``, keys and values from ``ctx`` of another length; key padding from a bool mask."""

    def forward(self, x, ctx, ctx_mask=None):
        B, S, _ = x.shape
        T = ctx.shape[1]
        q = self.q(x).view(B, S, self.heads, self.hd).transpose(1, 2)
        k = self.k(ctx).view(B, T, self.heads, self.hd).transpose(1, 2)
        v = self.v(ctx).view(B, T, self.heads, self.hd).transpose(1, 2)
        s = q @ k.transpose(-2, -1) * self.hd ** -0.5
        if ctx_mask is not None:
            s = s.masked_fill(~ctx_mask[:, None, None, :], float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class RelPosBias(_QKV):
    """T5-style: an additive relative-position bias from a learned table indexed by distance."""

    def __init__(self, dim=32, heads=4, max_dist=16):
        super().__init__(dim, heads)
        self.max_dist = max_dist
        self.table = nn.Embedding(2 * max_dist + 1, heads)

    def forward(self, x):
        q, k, v = self.split(x)
        S = x.shape[1]
        pos = torch.arange(S, device=x.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_dist, self.max_dist) + self.max_dist
        bias = self.table(rel).permute(2, 0, 1).unsqueeze(0)  # (1, H, S, S)
        s = torch.matmul(q, k.transpose(-1, -2)) + bias  # no scaling, as in T5
        return self.merge(torch.softmax(s.float(), dim=-1).to(q.dtype) @ v)


class Dropout(_QKV):
    """Dropout on the probabilities (active in training)."""

    def __init__(self, dim=32, heads=4, p=0.1):
        super().__init__(dim, heads, dropout=p)

    def forward(self, x):
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) * self.hd ** -0.5
        return self.merge(self.drop(s.softmax(-1)) @ v)


# ---- look-alikes that must NOT be rewritten ---------------------------------------------------

class SoftmaxOverQueries(_QKV):
    """Softmax over the query axis (dim=-2): not attention; SDPA would compute something else."""

    def forward(self, x):
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) * self.hd ** -0.5
        return self.merge(s.softmax(dim=-2) @ v)


class ScoresReused(_QKV):
    """The raw scores are also returned (an auxiliary loss reads them)."""

    def forward(self, x):
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) * self.hd ** -0.5
        y = self.merge(s.softmax(dim=-1) @ v)
        return y, s


class ZeroFill(_QKV):
    """``masked_fill(mask, 0.0)``: masked positions stay in the softmax with score 0."""

    def forward(self, x):
        q, k, v = self.split(x)
        S = x.shape[1]
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        s = (q @ k.transpose(-2, -1) * self.hd ** -0.5).masked_fill(mask, 0.0)
        return self.merge(s.softmax(dim=-1) @ v)


class ProbsReused(_QKV):
    """The attention probabilities are also returned (``output_attentions``)."""

    def forward(self, x):
        q, k, v = self.split(x)
        p = (q @ k.transpose(-2, -1) * self.hd ** -0.5).softmax(-1)
        return self.merge(p @ v), p


class Classifier(nn.Module):
    """A softmax over linear logits: no attention at all (must not even be reported)."""

    def __init__(self, dim=32):
        super().__init__()
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        return self.fc(x).softmax(-1)

"""Attention pass: every ``softmax(f(Q·Kᵀ))·V`` the matcher finds becomes one fused attention call.

Sites come from :func:`rewriter.patterns.attention.find_attention` whatever their spelling. The
score ops are folded into a scale, an optional soft-cap and an additive mask
(:func:`rewriter.patterns.masks.plan_scores`). A mask that depends on no user input is evaluated
once at compile time: no mask, or a plain causal one, needs no tensor at all (``is_causal``);
anything else is kept and passed as ``attn_mask``, computed in the graph by the same ops the model
used. GQA written as ``repeat_kv`` or ``repeat_interleave`` reads the un-repeated K and V
(``enable_gqa``).

Sites SDPA cannot express exactly (tanh soft-capping, fills that keep masked positions in the
softmax, scores used elsewhere, ...) are left as they are and the report says why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx import Node

from ..context import Builder, GraphContext
from ..cost import attention_estimate
from ..patterns.attention import AttentionSite, NotAttention, find_attention
from ..patterns.masks import MaskInfo, ScorePlan, classify_static, mask_from_steps, plan_scores
from ..patterns.ops import meta
from .base import GraphPass, Rewrite

__all__ = ["AttentionPass"]


class AttentionPass(GraphPass):
    name = "attention"
    kind = "attention"
    description = "softmax(Q·Kᵀ)·V in any spelling -> fused scaled_dot_product_attention"

    def run(self, ctx: GraphContext) -> None:
        rewrites: list[Rewrite] = []
        for m in find_attention(ctx.graph, ctx.scalar):
            if isinstance(m, NotAttention):
                self.skip(ctx, m.where, m.reason)
                continue
            if not ctx.config.selects(m.where):
                self.skip(ctx, m.where, "outside Config.modules")
                continue
            plan = plan_scores(m)
            if isinstance(plan, str):
                self.skip(ctx, m.where, plan, detail=_shape_text(m))
                continue
            _read_mask(ctx, m, plan)
            detail = _describe(m, plan)
            if plan.softcap is not None:
                self.skip(ctx, m.where, "tanh soft-capping: scaled_dot_product_attention cannot express it",
                          detail=detail)
                continue
            rewrites.append(self._rewrite(ctx, m, plan, detail))
        self.commit(ctx, rewrites)

    def _rewrite(self, ctx: GraphContext, m: AttentionSite, plan: ScorePlan, detail: str) -> Rewrite:
        gqa = m.gqa_ratio > 1
        k_src = m.k_repeat.source if gqa else m.k
        v_src = m.v_repeat.source if gqa else m.v
        keep_mask = plan.mask.kind not in ("none", "causal")
        est = _estimate(ctx, m, plan, keep_mask)
        site = self.site(ctx, m.where, detail + " -> sdpa", target="sdpa",
                         est_speedup=None if est.speedup is None else round(est.speedup, 2),
                         est_saved_ms=None if est.saved_ms is None else round(est.saved_ms, 4))
        inputs = [m.q, k_src, v_src] + (list(plan.tensors) if keep_mask else [])

        def emit(b: Builder, env: dict[Node, Node]) -> Node:
            return _emit_sdpa(b, env, m, plan, k_src, v_src, gqa, keep_mask)

        return Rewrite(site, m.output, list(dict.fromkeys(inputs)), emit,
                       random_inputs={m.q, k_src, v_src}, removable=m.chain[:-1])


def _read_mask(ctx: GraphContext, m: AttentionSite, plan: ScorePlan) -> None:
    """Classify the mask: evaluated at compile time when static, else by its shape."""
    if not plan.spec:
        plan.mask = MaskInfo("none", True)
        return
    q_dim, k_dim = m.scores_dims.index(m.q_axis), m.scores_dims.index(m.k_axis)
    if all(ctx.is_static(n) for n in plan.tensors):
        values = ctx.evaluate(plan.tensors)
        mask = mask_from_steps(plan.spec, plan.shape, plan.dtype, *[values[n] for n in plan.tensors])
        plan.mask = classify_static(mask, q_dim, k_dim, m.q_len, m.kv_len)
        return
    batch_dims = [i for i, c in enumerate(m.scores_dims) if c in m.batch]
    padding = plan.shape[q_dim] == 1 and all(plan.shape[i] == 1 for i in batch_dims[1:])
    has_bias = any(step[0] == "add" for step in plan.spec)
    plan.mask = MaskInfo("bias" if has_bias else ("key_padding" if padding else "mask"), False)


def _shape_text(m: AttentionSite) -> str:
    heads = f"{m.heads} heads" if m.batch else "1 head"
    return f"{heads}, q {m.q_len} kv {m.kv_len}, d {m.head_dim}"


def _describe(m: AttentionSite, plan: ScorePlan) -> str:
    parts = [plan.mask.describe() if plan.mask.kind != "none" else "no mask"]
    if plan.mask.kind in ("bias", "mask", "key_padding"):
        parts[-1] += " (static)" if plan.mask.static else " (from inputs)"
    if m.gqa_ratio > 1:
        parts.append(f"GQA {m.gqa_ratio}:1")
    parts.append(f"scale {plan.scale:.4g}")
    if plan.softcap is not None:
        parts.append(f"softcap {plan.softcap:g}")
    if m.dropout_p:
        parts.append(f"dropout {m.dropout_p:g}")
    parts.append(_shape_text(m))
    parts.extend(plan.notes)
    return ", ".join(parts)


def _estimate(ctx: GraphContext, m: AttentionSite, plan: ScorePlan, keep_mask: bool):
    slices = math.prod(m.batch_sizes) if m.batch else 1
    kv_slices = slices // m.gqa_ratio
    score_ops = sum(1 for n in m.chain[1:-1])
    return attention_estimate(
        ctx.device_spec, batch=slices, q_len=m.q_len, kv_len=m.kv_len, head_dim=m.head_dim,
        value_dim=m.value_dim, kv_batch=kv_slices, dtype=m.dtype,
        score_dtype=meta(m.softmax).dtype, score_ops=score_ops,
        mask_elems=math.prod(plan.shape) if keep_mask else 0, mask_kept=keep_mask,
        causal=plan.mask.kind in ("causal", "causal_bottom_right", "sliding_window"),
        inductor=ctx.config.inductor,
    )


def _arrange(b: Builder, x: Node, dims: str, target: str) -> Node:
    """Permute ``x`` (axes ``dims``) into ``target`` order, adding size-1 axes for missing letters."""
    for c in target:
        if c not in dims:
            x = b.call(torch.unsqueeze, x, -1)
            dims += c
    order = [dims.index(c) for c in target]
    if order != list(range(len(order))):
        x = b.call(torch.permute, x, order)
    return x


def _to4d(b: Builder, x: Node, nb: int, lead: list[int] | None = None) -> Node:
    """Fold ``nb`` leading batch axes into two (SDPA's fast kernels take (N, H, L, E)).

    With ``lead``, the leading ``nb - 1`` axes are first expanded to those sizes (for masks that
    broadcast over some of them).
    """
    if nb < 2:
        for _ in range(2 - nb):
            x = b.call(torch.unsqueeze, x, 0)
        return x
    if nb == 2:
        return x
    if lead is not None:
        x = b.call(torch.Tensor.expand, x, *lead, -1, -1, -1)
    return b.call(torch.flatten, x, 0, nb - 2)


def _emit_sdpa(b: Builder, env: dict[Node, Node], m: AttentionSite, plan: ScorePlan, k_src: Node, v_src: Node,
               gqa: bool, keep_mask: bool) -> Node:
    batch = m.batch
    sizes = m.batch_sizes
    nb = len(batch)
    def viewed(node: Node, role: str) -> Node:
        x = env[node]
        return b.call(torch.reshape, x, m.views[role]) if role in m.views else x

    q = _arrange(b, viewed(m.q, "q"), m.q_dims, batch + m.q_axis + m.d_axis)
    k = _arrange(b, viewed(k_src, "k"), m.k_dims, batch + m.k_axis + m.d_axis)
    v = _arrange(b, viewed(v_src, "v"), m.v_dims, batch + m.k_axis + m.e_axis)
    # K and V broadcast over batch axes the query has (MQA by broadcasting): expand as views.
    k_shape = _shape_after(m, "k", k_src, m.k_dims, batch)
    v_shape = _shape_after(m, "v", v_src, m.v_dims, batch)
    head = nb - 1
    for name, shape in (("k", k_shape), ("v", v_shape)):
        want = [sizes[i] if (shape[i] == 1 and not (gqa and i == head)) else shape[i] for i in range(nb)]
        if want != shape:
            if name == "k":
                k = b.call(torch.Tensor.expand, k, *want, -1, -1)
            else:
                v = b.call(torch.Tensor.expand, v, *want, -1, -1)
    q, k, v = _to4d(b, q, nb), _to4d(b, k, nb), _to4d(b, v, nb)
    kwargs: dict = {"scale": plan.scale}
    if keep_mask:
        mask = b.call(mask_from_steps, plan.spec, tuple(plan.shape), plan.dtype, *[env[n] for n in plan.tensors])
        mask = _arrange(b, mask, m.scores_dims, batch + m.q_axis + m.k_axis)
        mask = _to4d(b, mask, nb, sizes[:-1])
        mask = b.call(torch.Tensor.to, mask, m.dtype)
        kwargs["attn_mask"] = mask
    if plan.mask.kind == "causal":
        kwargs["is_causal"] = True
    if m.dropout_p and not b.validating:
        kwargs["dropout_p"] = m.dropout_p
    if gqa:
        kwargs["enable_gqa"] = True
    out = b.call(F.scaled_dot_product_attention, q, k, v, **kwargs)
    if nb > 2:
        out = b.call(torch.reshape, out, tuple(sizes) + (m.q_len, m.value_dim))
    else:
        for _ in range(2 - nb):
            out = b.call(torch.squeeze, out, 0)
    canon = batch + m.q_axis + m.e_axis
    order = [canon.index(c) for c in m.out_dims]
    if order != list(range(len(order))):
        out = b.call(torch.permute, out, order)
    if "out" in m.views:
        out = b.call(torch.reshape, out, tuple(meta(m.output).shape))
    if m.out_scale != 1.0:
        out = b.call(torch.mul, out, m.out_scale)
    out_dtype = meta(m.output).dtype
    if out_dtype != m.dtype:
        out = b.call(torch.Tensor.to, out, out_dtype)
    return out


def _shape_after(m: AttentionSite, role: str, node: Node, dims: str, batch: str) -> list[int]:
    """Batch sizes of ``node`` (axes ``dims``) in canonical batch order; 1 for missing letters."""
    shape = m.views.get(role, tuple(meta(node).shape))
    return [int(shape[dims.index(c)]) if c in dims else 1 for c in batch]

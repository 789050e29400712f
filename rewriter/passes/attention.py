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

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.fx import Node

from ..context import Builder, GraphContext
from ..cost import attention_estimate
from ..patterns.attention import AttentionSite, NotAttention, find_attention
from ..patterns.masks import MaskInfo, ScorePlan, classify_static, mask_from_steps, plan_scores, static_tables
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
            choice = _choose(ctx, m, plan)
            if isinstance(choice, str):
                self.skip(ctx, m.where, choice, detail=detail)
                continue
            rewrites.append(self._rewrite(ctx, m, plan, detail, *choice))
        self.commit(ctx, rewrites)

    def _rewrite(self, ctx: GraphContext, m: AttentionSite, plan: ScorePlan, detail: str, target: str,
                 why: str, est) -> Rewrite:
        gqa = m.gqa_ratio > 1
        k_src = m.k_repeat.source if gqa else m.k
        v_src = m.v_repeat.source if gqa else m.v
        keep_mask = _keeps_mask(plan, target)
        site = self.site(ctx, m.where, f"{detail} -> {target}" + (f" ({why})" if why else ""), target=target,
                         est_speedup=None if est.speedup is None else round(est.speedup, 2),
                         est_saved_ms=None if est.saved_ms is None else round(est.saved_ms, 4))
        inputs = [m.q, k_src, v_src] + (list(plan.tensors) if keep_mask else [])
        if target == "sdpa":
            call = _sdpa_call(m, plan, gqa, keep_mask)
        elif target == "flex":
            call = _flex_call(m, plan)
        else:
            call = _triton_call(m, plan, keep_mask)

        def emit(b: Builder, env: dict[Node, Node]) -> Node:
            return _emit(b, env, m, plan, k_src, v_src, gqa, keep_mask, call)

        return Rewrite(site, m.output, list(dict.fromkeys(inputs)), emit,
                       random_inputs={m.q, k_src, v_src}, removable=m.chain[:-1])


# ---- choosing a target per site -------------------------------------------------------------------

_KERNEL_KINDS = ("none", "causal", "causal_bottom_right", "sliding_window")


def _keeps_mask(plan: ScorePlan, target: str) -> bool:
    """Whether the emitted call needs the mask tensor (else the mask lives in the call's arguments)."""
    mask = plan.mask
    if target == "sdpa":
        return not (mask.kind in ("none", "causal") and mask.alibi_slopes is None)
    if target == "flex":
        return False
    return mask.kind == "key_padding"


def _flex_expresses(m: AttentionSite, plan: ScorePlan) -> str | None:
    """None when FlexAttention computes this site from tables derived at compile time, else why not."""
    if plan.tables is None:
        return ("the mask depends on the inputs or on parameters" if not plan.mask.static else
                f"the {plan.mask.describe()} mask has no table form (it differs by batch, or masks whole rows)")
    if m.dropout_p:
        return "dropout in training (FlexAttention has none)"
    if m.value_dim != m.head_dim:
        return "value head dim differs from the query/key head dim"
    return None


def _kernel_expresses(plan: ScorePlan) -> str | None:
    """None when the Triton kernel computes this site exactly from indices, else why not."""
    kind = plan.mask.kind
    if kind in _KERNEL_KINDS or kind == "key_padding":
        return None
    return f"the {plan.mask.describe()} mask is not one of the kernel's built-in variants"


def _kernel_supports(ctx: GraphContext, m: AttentionSite, plan: ScorePlan) -> str | None:
    """None when the kernel can run this site's tensors, else why not."""
    from ..kernels.flash_attention import supports

    if m.value_dim != m.head_dim:
        return "value head dim differs from the query/key head dim"
    if m.dropout_p and m.dtype == torch.float32:
        return "dropout with fp32 inputs"
    fake = ctx.fake_mode
    dev = meta(m.q).device
    n = math.prod(m.batch_sizes[:-1]) if len(m.batch) > 1 else 1
    heads = m.heads if m.batch else 1
    kv_heads = heads // m.gqa_ratio
    with fake if fake is not None else contextlib.nullcontext():
        q = torch.empty(n, heads, m.q_len, m.head_dim, device=dev, dtype=m.dtype)
        k = torch.empty(n, kv_heads, m.kv_len, m.head_dim, device=dev, dtype=m.dtype)
        ok, why = supports(q, k, k, scale=plan.scale, softcap=plan.softcap)
    return None if ok else why


def _on_cuda(m: AttentionSite) -> bool:
    return meta(m.q).device.type == "cuda"


def _choose(ctx: GraphContext, m: AttentionSite, plan: ScorePlan):
    """(target, why, estimate) for a site, or the reason it is left alone."""
    forced = ctx.config.attention_backend
    sdpa_ok = plan.softcap is None
    kernel_why = _kernel_expresses(plan) or _kernel_supports(ctx, m, plan)
    flex_why = _flex_expresses(m, plan)
    est_sdpa = _estimate(ctx, m, plan, "sdpa")
    if forced == "flex":
        if flex_why:
            return f"attention_backend='flex' but FlexAttention cannot take this site: {flex_why}"
        return "flex", "forced by config", _estimate(ctx, m, plan, "flex")
    if forced == "sdpa":
        if not sdpa_ok:
            return "tanh soft-capping: scaled_dot_product_attention cannot express it"
        return "sdpa", "forced by config", est_sdpa
    if forced == "triton":
        if kernel_why:
            return f"attention_backend='triton' but the kernel cannot take this site: {kernel_why}"
        return "triton", "forced by config", _estimate(ctx, m, plan, "triton")
    on_gpu = _on_cuda(m)
    if not on_gpu:
        if not sdpa_ok:
            return "tanh soft-capping needs the Triton kernel or FlexAttention, which run on CUDA"
        return "sdpa", "", est_sdpa
    options = []  # (seconds, target, why, estimate)
    if sdpa_ok:
        options.append((est_sdpa.seconds_after, "sdpa", "", est_sdpa))
    if not kernel_why:
        est = _estimate(ctx, m, plan, "triton")
        options.append((est.seconds_after, "triton", "mask computed in the kernel" if sdpa_ok else "soft-capping", est))
    if not flex_why:
        est = _estimate(ctx, m, plan, "flex")
        options.append((est.seconds_after, "flex", "mask and bias from compile-time tables, masked blocks skipped", est))
    if not options:
        return f"tanh soft-capping needs the Triton kernel ({kernel_why}) or FlexAttention ({flex_why})"
    if any(o[0] is None for o in options):
        return options[0][1:]  # no estimates for this device: the first option that can express the site
    return min(options, key=lambda o: o[0])[1:]


def _read_mask(ctx: GraphContext, m: AttentionSite, plan: ScorePlan) -> None:
    """Classify the mask: evaluated at compile time when static, else by its shape."""
    if not plan.spec:
        plan.mask = MaskInfo("none", True)
        return
    q_dim, k_dim = m.scores_dims.index(m.q_axis), m.scores_dims.index(m.k_axis)
    if all(ctx.is_static(n) for n in plan.tensors):
        values = ctx.evaluate(plan.tensors)
        mask = mask_from_steps(plan.spec, plan.shape, plan.dtype, *[values[n] for n in plan.tensors])
        head = m.scores_dims.index(m.batch[-1]) if m.batch else None
        plan.mask = classify_static(mask, q_dim, k_dim, m.q_len, m.kv_len, head)
        if plan.mask.kind in ("mask", "bias"):
            plan.tables = static_tables(mask, q_dim, k_dim, m.q_len, m.kv_len, head)
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


def _visible_fraction(m: AttentionSite, plan: ScorePlan) -> float:
    """Fraction of the score entries a fused kernel must compute (it skips masked blocks)."""
    kind, sq, skv = plan.mask.kind, m.q_len, m.kv_len
    if kind in ("causal", "causal_bottom_right"):
        return min(1.0, (sq * skv - sq * (sq - 1) / 2) / (sq * skv)) if kind == "causal" else 0.5
    if kind == "sliding_window":
        left, right = plan.mask.window
        width = (left if left is not None else skv) + (right if right is not None else skv) + 1
        return min(1.0, width / skv)
    if plan.tables is not None:
        return float(plan.tables[0].float().mean())
    return 1.0


def _estimate(ctx: GraphContext, m: AttentionSite, plan: ScorePlan, target: str):
    slices = math.prod(m.batch_sizes) if m.batch else 1
    kv_slices = slices // m.gqa_ratio
    keep = _keeps_mask(plan, target)
    if target == "sdpa":
        # SDPA skips masked blocks only for is_causal; with a mask tensor it computes every block.
        frac = _visible_fraction(m, plan) if plan.mask.kind == "causal" and not keep else 1.0
    else:
        frac = _visible_fraction(m, plan)
    return attention_estimate(
        ctx.device_spec, batch=slices, q_len=m.q_len, kv_len=m.kv_len, head_dim=m.head_dim,
        value_dim=m.value_dim, kv_batch=kv_slices, dtype=m.dtype,
        score_dtype=meta(m.softmax).dtype, score_ops=len(m.chain) - 2,
        mask_elems=math.prod(plan.shape) if keep else 0, mask_kept=keep,
        visible_fraction=frac, inductor=ctx.config.inductor,
        efficiency=None if target == "sdpa" else target,
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


def _sdpa_call(m: AttentionSite, plan: ScorePlan, gqa: bool, keep_mask: bool):
    def call(b: Builder, q: Node, k: Node, v: Node, mask: Node | None) -> Node:
        kwargs: dict = {"scale": plan.scale}
        if mask is not None:
            kwargs["attn_mask"] = mask
        if plan.mask.kind == "causal" and not keep_mask:
            kwargs["is_causal"] = True
        if m.dropout_p and not b.validating:
            kwargs["dropout_p"] = m.dropout_p
        if gqa:
            kwargs["enable_gqa"] = True
        return b.call(F.scaled_dot_product_attention, q, k, v, **kwargs)

    return call


def _triton_call(m: AttentionSite, plan: ScorePlan, keep_mask: bool):
    from ..kernels.flash_attention import flash_attention

    mask = plan.mask
    kwargs: dict = {"scale": plan.scale}
    if mask.kind == "causal":
        kwargs["causal"] = True
    elif mask.kind == "causal_bottom_right":
        kwargs.update(causal=True, causal_align="bottom_right")
    elif mask.kind == "sliding_window":
        kwargs["window"] = tuple(mask.window)
    if plan.softcap is not None:
        kwargs["softcap"] = plan.softcap
    slopes = None if mask.alibi_slopes is None else [float(x) for x in mask.alibi_slopes]

    def call(b: Builder, q: Node, k: Node, v: Node, pad: Node | None) -> Node:
        extra = dict(kwargs)
        if slopes is not None:
            extra["alibi_slopes"] = b.call(torch.tensor, slopes, dtype=torch.float32, device=meta(m.q).device)
        if pad is not None:
            extra["key_padding_mask"] = pad
        if m.dropout_p and not b.validating:
            extra["dropout_p"] = m.dropout_p
        return b.call(flash_attention, q, k, v, **extra)

    return call


def _flex_call(m: AttentionSite, plan: ScorePlan):
    from ..kernels.flex import flex_attention_static, register

    keep, bias = plan.tables
    key = register(keep, bias, plan.scale, plan.softcap)

    def call(b: Builder, q: Node, k: Node, v: Node, mask: Node | None) -> Node:
        return b.call(flex_attention_static, q, k, v, key=key)

    return call


def _emit(b: Builder, env: dict[Node, Node], m: AttentionSite, plan: ScorePlan, k_src: Node, v_src: Node,
          gqa: bool, keep_mask: bool, call) -> Node:
    """Arrange q, k, v (and the mask) into (N, H, L, E), make the call, and restore the output layout."""
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
    mask = None
    if keep_mask:
        mask = b.call(mask_from_steps, plan.spec, tuple(plan.shape), plan.dtype, *[env[n] for n in plan.tensors])
        mask = _arrange(b, mask, m.scores_dims, batch + m.q_axis + m.k_axis)
        mask = _to4d(b, mask, nb, sizes[:-1])
        mask = b.call(torch.Tensor.to, mask, m.dtype if plan.mask.kind != "key_padding" else torch.float32)
    out = call(b, q, k, v, mask)
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

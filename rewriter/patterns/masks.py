"""What the ops between the scores and the softmax amount to: a scale, a soft-cap and a mask.

For a matched attention the score ops (:class:`~rewriter.patterns.attention.Transform`) are folded
into ``softmax(cap * tanh(scale * q·k / cap) + M)`` (without the tanh when there is no soft-cap),
where ``M`` is what the same ops produce when applied to zeros: additive biases, masked fills and
``where`` selections, in model order. ``M`` is computed by :func:`mask_from_steps`, one plain
function used both to build the mask inside the rewritten graph and to evaluate it at compile time.

When ``M`` depends on nothing the user passes in (transformers builds its causal mask from
``arange``; nanoGPT slices a registered ``tril`` buffer), :func:`classify_static` reads it as a
function of (q_idx, kv_idx): none, causal (top-left or bottom-right aligned), sliding window, a
static bias, or another mask. Registered buffers are taken at their value at compile time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention import AttentionSite, Transform
from .ops import meta, op

__all__ = ["ScorePlan", "plan_scores", "mask_from_steps", "classify_static", "static_tables", "MaskInfo",
           "MASKED_BELOW"]

# A filled or added value at or below this masks a position: exp(-1e4) underflows to 0 in fp32,
# so such a position gets zero probability in any row that has one unmasked position.
MASKED_BELOW = -1.0e4


@dataclass
class MaskInfo:
    """A mask read as a function of positions. ``kind`` is one of "none", "causal",
    "causal_bottom_right", "sliding_window", "key_padding", "bias", "mask"; an ALiBi bias on top of
    a band kind sets ``alibi_slopes``."""

    kind: str
    static: bool
    window: tuple[int | None, int | None] | None = None  # (left, right) kept around the diagonal
    offset: int = 0  # diagonal offset: kv_idx <= q_idx + offset for causal kinds
    alibi_slopes: torch.Tensor | None = None  # per head: bias slope * (kv_idx - q_idx) on kept positions

    def describe(self) -> str:
        if self.kind == "sliding_window":
            left, right = self.window
            text = f"sliding window (left {left}, right {right})"
        elif self.kind == "causal_bottom_right":
            text = "causal (bottom-right)"
        else:
            text = self.kind.replace("_", " ")
        if self.alibi_slopes is not None:
            text = "ALiBi" if self.kind == "none" else f"ALiBi + {text}"
        return text


@dataclass
class ScorePlan:
    """``softmax(cap*tanh(scale*s/cap) + M)`` with ``M = mask_from_steps(spec, ...)``."""

    scale: float
    softcap: float | None
    spec: tuple = ()
    tensors: list = field(default_factory=list)  # nodes feeding the mask steps, in spec order
    shape: tuple[int, ...] = ()  # shape of M (broadcastable to the scores)
    dtype: torch.dtype = torch.float32
    mask: MaskInfo = field(default_factory=lambda: MaskInfo("none", True))
    notes: list[str] = field(default_factory=list)
    # For a static mask that is no band: (keep, bias) as functions of ([head,] q_idx, kv_idx).
    tables: tuple[torch.Tensor, torch.Tensor | None] | None = None


def plan_scores(site: AttentionSite) -> ScorePlan | str:
    """Fold the site's score ops into a :class:`ScorePlan`, or say why they cannot be folded."""
    pre, post = 1.0, 1.0  # scales before and after tanh
    tanh = False
    steps: list[Transform] = []
    notes: list[str] = []
    for t in site.transforms:
        if t.kind == "cast":
            continue
        if t.kind == "scale":
            if steps:
                if t.value < 0:
                    return "a negative scale applied after the mask"
                steps.append(t)
            if tanh:
                post *= t.value
            else:
                pre *= t.value
        elif t.kind == "const":
            if not tanh and _has_tanh_after(site.transforms, t):
                return "a constant added before tanh soft-capping"
            # softmax is invariant to adding a constant along the softmax axis
        elif t.kind in ("add", "fill"):
            if not tanh and _has_tanh_after(site.transforms, t):
                return "a bias or mask applied before tanh soft-capping"
            if t.kind == "fill":
                final = t.value * math.prod(s.value for s in _after(site.transforms, t) if s.kind == "scale")
                if final > MASKED_BELOW:
                    return (f"masked_fill with {t.value:g} keeps the filled positions in the softmax; "
                            "an additive mask cannot express that exactly")
                if not math.isinf(final) and final > torch.finfo(torch.float32).min / 2:
                    notes.append(f"fill {t.value:g} treated as masking (a row with every key "
                                 "masked may differ from eager)")
            steps.append(t)
        elif t.kind == "tanh":
            if tanh:
                return "two tanh ops between the scores and the softmax"
            tanh = True
    if tanh and post <= 0:
        return "tanh soft-capping with a non-positive cap"
    spec, tensors, shapes = _spec(steps)
    try:
        shape = tuple(torch.broadcast_shapes(*shapes)) if shapes else ()
    except RuntimeError:
        return "mask shapes do not broadcast"
    scores_shape = tuple(meta(site.softmax).shape)
    if len(shape) > len(scores_shape):
        return "the mask has more axes than the scores"
    shape = (1,) * (len(scores_shape) - len(shape)) + shape
    dtype = meta(op(site.softmax)["input"]).dtype
    return ScorePlan(
        scale=pre * post if tanh else pre,
        softcap=post if tanh else None,
        spec=spec,
        tensors=tensors,
        shape=shape,
        dtype=dtype,
        mask=MaskInfo("none", True) if not spec else MaskInfo("mask", False),
        notes=notes,
    )


def _after(transforms: Sequence[Transform], t: Transform) -> list[Transform]:
    return list(transforms[transforms.index(t) + 1:])


def _has_tanh_after(transforms: Sequence[Transform], t: Transform) -> bool:
    return any(s.kind == "tanh" for s in _after(transforms, t))


def _spec(steps: list[Transform]) -> tuple[tuple, list, list]:
    """Encode mask steps as hashable constants plus the tensor nodes they read (and their shapes)."""
    spec, tensors, shapes, index = [], [], [], {}
    for t in steps:
        if t.kind == "scale":
            spec.append(("scale", float(t.value)))
            continue
        if t.node not in index:
            index[t.node] = len(tensors)
            tensors.append(t.node)
        shape = t.view or tuple(int(n) for n in meta(t.node).shape)
        shapes.append(shape)
        view = tuple(t.view) if t.view is not None else None
        if t.kind == "add":
            spec.append(("add", index[t.node], float(t.value), view))
        else:
            spec.append(("fill", index[t.node], float(t.value), bool(t.when), view))
    return tuple(spec), tensors, shapes


def mask_from_steps(spec: tuple, shape: Sequence[int], dtype: torch.dtype, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply the score steps in ``spec`` to zeros of ``shape``: the additive mask they amount to."""
    device = tensors[0].device if tensors else None
    m = torch.zeros(tuple(shape), dtype=dtype, device=device)
    for step in spec:
        if step[0] == "scale":
            m = m * step[1]
        elif step[0] == "add":
            t = tensors[step[1]] if step[3] is None else tensors[step[1]].reshape(step[3])
            m = m + t * step[2] if step[2] != 1.0 else m + t
        else:
            cond = tensors[step[1]] if step[4] is None else tensors[step[1]].reshape(step[4])
            if cond.dtype != torch.bool:
                cond = cond.bool()
            if not step[3]:
                cond = ~cond
            m = m.masked_fill(cond, step[2])
    return m


def classify_static(m: torch.Tensor, q_dim: int, k_dim: int, q_len: int, kv_len: int,
                    head_dim: int | None = None) -> MaskInfo:
    """Read a compile-time mask (in scores layout) as a function of (q_idx, kv_idx).

    The mask must be the same for every batch index; along ``head_dim`` (the heads axis) it may
    also differ by an ALiBi bias ``slope[h] * (kv_idx - q_idx)`` (a per-row constant on top is
    allowed: softmax ignores it).
    """
    if head_dim is not None:
        m = m.movedim(head_dim, 0)
        q_dim, k_dim = [d + (d < head_dim) if d >= 0 else d for d in (q_dim, k_dim)]
        m = m.movedim((q_dim, k_dim), (-2, -1))
        m = m.expand(*m.shape[:-2], q_len, kv_len)
        heads = m.shape[0]
        per_head = m.reshape(heads, -1, q_len, kv_len)
        if not bool((per_head == per_head[:, :1]).all()):
            return MaskInfo("mask", True)
        slices = per_head[:, 0]
    else:
        m = m.movedim((q_dim, k_dim), (-2, -1))
        m = m.expand(*m.shape[:-2], q_len, kv_len)
        flat = m.reshape(-1, q_len, kv_len)
        if not bool((flat == flat[0]).all()):
            return MaskInfo("mask", True)
        slices = flat[:1]
    first = slices[0]
    keep = first > MASKED_BELOW
    if not bool(((slices > MASKED_BELOW) == keep).all()):
        return MaskInfo("mask", True)
    band = _band(keep, q_len, kv_len)
    if band is None:
        return MaskInfo("mask", True)
    values = torch.where(keep, slices.double(), torch.zeros((), dtype=torch.float64, device=slices.device))
    if not bool((values != 0).any()):
        return band
    slopes = _alibi_slopes(values, keep)
    if slopes is None:
        return MaskInfo("bias", True)
    band.alibi_slopes = slopes
    return band


def static_tables(m: torch.Tensor, q_dim: int, k_dim: int, q_len: int, kv_len: int,
                  head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A compile-time mask as lookup tables: ``keep`` (bool) and ``bias`` (values at kept positions,
    None when they are all zero), shaped (Sq, Skv), or (H, Sq, Skv) when they differ by head. None
    when the mask differs along other batch axes or masks every key of some row."""
    m = m.movedim((q_dim, k_dim), (-2, -1))
    nd = m.dim()
    head = None if head_dim is None else [d for d in range(nd) if d not in (q_dim % nd, k_dim % nd)].index(head_dim)
    m = m.expand(*m.shape[:-2], q_len, kv_len)
    if head is not None:
        m = m.movedim(head, 0)
        m = m.reshape(m.shape[0], -1, q_len, kv_len)
        if not bool((m == m[:, :1]).all()):
            return None
        m = m[:, 0]
        if bool((m == m[:1]).all()):
            m = m[0]
    else:
        flat = m.reshape(-1, q_len, kv_len)
        if not bool((flat == flat[0]).all()):
            return None
        m = flat[0]
    keep = m > MASKED_BELOW
    if not bool(keep.any(dim=-1).all()):
        return None
    values = torch.where(keep, m.float(), torch.zeros((), device=m.device))
    return keep, (values if bool((values != 0).any()) else None)


def _alibi_slopes(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """Per-head slopes if ``values[h, i, j] == slope[h] * (j - i) + c[h, i]`` on kept positions."""
    q_len, kv_len = keep.shape
    i = torch.arange(q_len, device=values.device, dtype=torch.float64).view(-1, 1)
    j = torch.arange(kv_len, device=values.device, dtype=torch.float64).view(1, -1)
    rel = (j - i).expand(q_len, kv_len)
    n = keep.sum(dim=-1, keepdim=True).clamp_min(1)
    # remove the per-row constant, then least squares for the slope
    rel_c = torch.where(keep, rel - (rel * keep).sum(-1, keepdim=True) / n, torch.zeros_like(rel))
    val_c = torch.where(keep, values - (values * keep).sum(-1, keepdim=True) / n, torch.zeros_like(values))
    denom = (rel_c ** 2).sum()
    if denom == 0:
        return None
    slopes = (val_c * rel_c).sum(dim=(-2, -1)) / denom
    resid = (val_c - slopes.view(-1, 1, 1) * rel_c).abs().amax()
    scale = values.abs().amax().clamp_min(1e-30)
    if resid > 1e-4 * scale:
        return None
    return slopes.float()


def _band(keep: torch.Tensor, q_len: int, kv_len: int) -> MaskInfo | None:
    """The keep-pattern as none / causal / bottom-right causal / sliding window, or None."""
    if bool(keep.all()):
        return MaskInfo("none", True)
    i = torch.arange(q_len, device=keep.device).view(-1, 1)
    j = torch.arange(kv_len, device=keep.device).view(1, -1)
    rel = j - i  # kv_idx - q_idx
    if not bool(keep.any(dim=-1).all()):
        return None  # rows with every key masked
    # Band structure: the kept positions of each row are one contiguous run at a fixed offset.
    lo = torch.where(keep, rel, torch.full_like(rel, kv_len + q_len)).amin(dim=-1)
    hi = torch.where(keep, rel, torch.full_like(rel, -(kv_len + q_len))).amax(dim=-1)
    band = (rel >= lo.view(-1, 1)) & (rel <= hi.view(-1, 1))
    if not bool((band == keep).all()):
        return None
    # Each edge is a fixed distance from the diagonal except where the sequence bounds clip it.
    right = _edge(hi, lambda r: kv_len - 1 - r, upper=True)
    left = _edge(-lo, lambda r: r, upper=True)
    if right is None or left is None:
        return None
    left = None if left >= _UNBOUNDED else left
    right = None if right >= _UNBOUNDED else right
    if left is None and right is None:
        return MaskInfo("none", True)
    if left is None and right == 0:
        return MaskInfo("causal", True, offset=0)
    if left is None and right == kv_len - q_len:
        return MaskInfo("causal_bottom_right", True, offset=right)
    return MaskInfo("sliding_window", True, window=(left, right), offset=right or 0)


_UNBOUNDED = 1 << 30


def _edge(values: torch.Tensor, limit, upper: bool) -> int | None:
    """The constant a per-row edge equals wherever it is not clipped by the sequence bounds.

    ``values[r]`` is the kept extent of row r on one side; ``limit(r)`` the largest it could be.
    Returns that constant (or a huge number when every row is clipped, i.e. unbounded).
    """
    rows = torch.arange(values.numel(), device=values.device)
    lim = torch.tensor([limit(int(r)) for r in rows], device=values.device)
    unclipped = values < lim
    if not bool(unclipped.any()):
        return _UNBOUNDED
    vals = values[unclipped].unique()
    if vals.numel() != 1:
        return None
    v = int(vals.item())
    if bool((lim[~unclipped] > v).any()):
        return None
    return v

"""Find attention by what it computes: ``softmax(f(Q Kᵀ)) V``.

The anchor is a softmax. From it the matcher walks back through the ops models put between the
scores and the softmax (scalar scales, additive biases, masked fills, ``where``, casts, tanh
soft-capping) to a product of two tensors, and forward through casts, dropout and layout ops to the
product with V. Products of any spelling are read as einsum-like descriptions
(:mod:`rewriter.patterns.products`), so the axis letters tell which operand is Q (its free axis is
kept), which is K (its free axis is the one the softmax runs over) and which axis is contracted
with V. Nothing here depends on a module or function name.

The result is an :class:`AttentionSite` (or a :class:`NotAttention` saying why a softmax over
Q·Kᵀ scores cannot be rewritten). It only describes; :mod:`rewriter.passes.attention` decides and
edits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node

from .graph import module_path, source_location
from .ops import meta, op
from .products import Product, ScalarFn, describe_product, refine_shape, split_batch

__all__ = [
    "AttentionSite",
    "NotAttention",
    "Transform",
    "GQARepeat",
    "find_attention",
]

# How far back from a softmax the matcher looks for the scores product (ops between them).
_MAX_CHAIN = 24


@dataclass
class Transform:
    """One step between the scores product and the softmax, in the order the model applies it.

    kind: "scale" (``value``), "add" (``node`` times ``value``), "const" (adds ``value``), "fill"
    (positions where ``node`` is ``when`` get ``value``), "tanh", "cast" (to ``dtype``).
    """

    kind: str
    value: float = 1.0
    node: Node | None = None
    when: bool = True
    dtype: torch.dtype | None = None
    at: Node | None = None  # the graph node that applies it
    merged: bool = False  # applied before a reshape that splits batch axes (set ``view`` for it)
    view: tuple[int, ...] | None = None  # shape to view ``node`` as, in the softmax's layout

    def describe(self) -> str:
        if self.kind == "scale":
            return f"*{self.value:g}"
        if self.kind == "add":
            return f"+{self.node.name}" if self.value == 1 else f"+{self.value:g}*{self.node.name}"
        if self.kind == "const":
            return f"+{self.value:g}"
        if self.kind == "fill":
            return f"fill({'' if self.when else '~'}{self.node.name}, {self.value:g})"
        if self.kind == "cast":
            return f"to {str(self.dtype).replace('torch.', '')}"
        return self.kind


@dataclass
class GQARepeat:
    """K or V made by repeating each of ``source``'s heads ``ratio`` times along ``axis``."""

    source: Node
    axis: int
    ratio: int


@dataclass
class AttentionSite:
    """A matched attention: ``out[out_dims] = softmax(T(q·k))[.., q, k] · v[.., k, e]``.

    Axis letters: ``batch`` (kept from both operands, e.g. batch and heads), ``q_axis`` (query
    positions), ``k_axis`` (key positions, the softmax axis), ``d_axis`` (contracted head dim),
    ``e_axis`` (value head dim). ``q_dims``/``k_dims``/``v_dims``/``out_dims`` give the axis order
    of ``q``, ``k``, ``v`` and the output. ``transforms`` are the score ops in model order, starting
    with the scales pulled out of the products.
    """

    where: str
    softmax: Node
    scores: Product
    values: Product
    output: Node
    q: Node
    k: Node
    v: Node
    q_dims: str
    k_dims: str
    v_dims: str
    out_dims: str
    scores_dims: str
    batch: str
    q_axis: str
    k_axis: str
    d_axis: str
    e_axis: str
    transforms: list[Transform]
    dropout_p: float = 0.0
    out_scale: float = 1.0
    k_repeat: GQARepeat | None = None
    v_repeat: GQARepeat | None = None
    chain: list[Node] = field(default_factory=list)
    # Shapes to view q / k / v / out as when merged batch axes were refined (bmm over B*H).
    views: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def shape_of(self, role: str) -> tuple[int, ...]:
        """Shape of q, k, v or out in the site's axis letters (after any view)."""
        if role in self.views:
            return self.views[role]
        node = {"q": self.q, "k": self.k, "v": self.v, "out": self.output}[role]
        return tuple(int(x) for x in meta(node).shape)

    def size(self, letter: str) -> int:
        for role, dims in (("q", self.q_dims), ("k", self.k_dims), ("v", self.v_dims)):
            shape = self.shape_of(role)
            if letter in dims and shape[dims.index(letter)] != 1:
                return int(shape[dims.index(letter)])
        return 1

    @property
    def dtype(self) -> torch.dtype:
        return meta(self.q).dtype

    @property
    def q_len(self) -> int:
        return self.size(self.q_axis)

    @property
    def kv_len(self) -> int:
        return self.size(self.k_axis)

    @property
    def head_dim(self) -> int:
        return self.size(self.d_axis)

    @property
    def value_dim(self) -> int:
        return self.size(self.e_axis)

    @property
    def batch_sizes(self) -> list[int]:
        return [self.size(c) for c in self.batch]

    @property
    def heads(self) -> int:
        return self.size(self.batch[-1]) if self.batch else 1

    @property
    def gqa_ratio(self) -> int:
        kr, vr = self.k_repeat, self.v_repeat
        if kr is None or vr is None or kr.ratio != vr.ratio or not self.batch:
            return 1
        if self.k_dims[kr.axis] != self.batch[-1] or self.v_dims[vr.axis] != self.batch[-1]:
            return 1
        return kr.ratio


@dataclass
class NotAttention:
    """A softmax over Q·Kᵀ-shaped scores that cannot be treated as attention, and why."""

    where: str
    softmax: Node
    reason: str


def site_location(node: Node) -> str:
    return module_path(node) or source_location(node)


def find_attention(graph: Graph, scalar: ScalarFn) -> list[AttentionSite | NotAttention]:
    """Every softmax in ``graph`` whose input comes from a product of two tensors, described."""
    found: list[AttentionSite | NotAttention] = []
    for node in graph.nodes:
        o = op(node)
        if o is None or o.name != "softmax":
            continue
        result = _match(node, o, scalar)
        if result is not None:
            found.append(result)
    return found


def _is_weight(node: Any) -> bool:
    """True for a parameter placeholder (a product with it is a linear layer, not attention)."""
    return isinstance(node, Node) and node.op in ("placeholder", "get_attr") and \
        isinstance(meta(node), torch.nn.Parameter)


def _reaches_product(node: Any, scalar: ScalarFn, depth: int = _MAX_CHAIN) -> bool:
    if not isinstance(node, Node) or depth <= 0:
        return False
    p = describe_product(node, scalar)
    if p is not None:
        return not (_is_weight(p.lhs) or _is_weight(p.rhs))
    o = op(node)
    if o is None or o.name not in _SCORE_OPS:
        return False
    return any(_reaches_product(a, scalar, depth - 1) for a in _tensor_args(o))


_SCORE_OPS = {"cast", "identity", "contiguous", "mul", "div", "add", "sub", "masked_fill", "where",
              "tanh", "neg", "reshape"}


def _batch_reshape(node: Node, src: Any) -> bool:
    """A reshape that only merges or splits leading (batch) axes: the last two axes are kept."""
    a, b = meta(src), meta(node)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 2 or b.dim() < 2:
        return False
    return tuple(a.shape[-2:]) == tuple(b.shape[-2:]) and a.numel() == b.numel()


def _tensor_args(o) -> list[Node]:
    keys = {"masked_fill": ("input",), "where": ("input", "other"), "reshape": ("input",)}.get(
        o.name, ("input", "other"))
    return [o.args[k] for k in keys if isinstance(o.args.get(k), Node)]


def _data_users(node: Node) -> list[Node]:
    """Users that read ``node``'s values (not those that only take its dtype, like ``type_as``)."""
    out = []
    for u in node.users:
        if u.op == "call_method" and u.target == "type_as" and u.args[0] is not node:
            continue
        out.append(u)
    return out


def _scalar_of(x: Any, scalar: ScalarFn) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return scalar(x)


def _walk_scores(start: Node, scalar: ScalarFn):
    """From the softmax input back to the scores product. Returns (product, transforms, chain) or a reason."""
    steps: list[Transform] = []
    chain: list[Node] = []
    cur = start
    reshaped_at = None  # steps[reshaped_at:] lie between the product and a reshape of the scores
    for _ in range(_MAX_CHAIN):
        if len(_data_users(cur)) != 1:
            return f"the scores ({cur.name}) are also used by {len(_data_users(cur)) - 1} other op(s)"
        p = describe_product(cur, scalar)
        if p is not None:
            if reshaped_at is not None:
                for t in steps[reshaped_at:]:
                    t.merged = True
            chain.append(cur)
            steps.reverse()
            head: list[Transform] = []
            if p.scale != 1.0:
                head.append(Transform("scale", p.scale, at=cur))
            if p.bias is not None:
                head.append(Transform("add", p.bias_coeff, node=p.bias, at=cur, merged=reshaped_at is not None))
            return p, head + steps, chain
        o = op(cur)
        if o is None or o.name not in _SCORE_OPS:
            return f"{_describe_node(cur)} between the scores and the softmax"
        chain.append(cur)
        if o.name == "reshape":
            if not _batch_reshape(cur, o["input"]):
                return "a reshape of the scores that changes the query or key axis"
            reshaped_at = len(steps)
            cur = o["input"]
            continue
        if o.name in ("cast", "identity", "contiguous"):
            if o.name == "cast":
                steps.append(Transform("cast", dtype=o["dtype"], at=cur))
            cur = o["input"]
            continue
        if o.name == "tanh":
            steps.append(Transform("tanh", at=cur))
            cur = o["input"]
            continue
        if o.name == "neg":
            steps.append(Transform("scale", -1.0, at=cur))
            cur = o["input"]
            continue
        if o.name == "masked_fill":
            value = _scalar_of(o["value"], scalar)
            if value is None or not isinstance(o["input"], Node):
                return "masked_fill with a non-scalar value"
            steps.append(Transform("fill", value, node=o["mask"], when=True, at=cur))
            cur = o["input"]
            continue
        if o.name == "where":
            a, b = o["input"], o["other"]
            a_path = _reaches_product(a, scalar)
            b_path = _reaches_product(b, scalar)
            if a_path == b_path:
                return "a where() whose branches both (or neither) lead to the scores"
            value = _scalar_of(b if a_path else a, scalar)
            if value is None:
                return "a where() selecting between the scores and a tensor"
            steps.append(Transform("fill", value, node=o["condition"], when=not a_path, at=cur))
            cur = a if a_path else b
            continue
        # mul / div / add / sub: one operand continues the chain.
        a, b = o["input"], o["other"]
        a_path = _reaches_product(a, scalar)
        b_path = _reaches_product(b, scalar)
        if a_path and b_path:
            return f"{_describe_node(cur)} combines two products"
        if not (a_path or b_path):
            return f"{_describe_node(cur)}: no scores product behind it"
        chain_arg, other = (a, b) if a_path else (b, a)
        c = _scalar_of(other, scalar)
        if o.name == "mul":
            if c is None:
                return f"the scores are multiplied by a tensor ({_describe_node(other)})"
            steps.append(Transform("scale", c, at=cur))
        elif o.name == "div":
            if c is None or not a_path or c == 0 or o.get("rounding_mode") is not None:
                return "the scores are divided by a tensor or divide something"
            steps.append(Transform("scale", 1.0 / c, at=cur))
        else:
            alpha = o.get("alpha", 1)
            if not isinstance(alpha, (int, float)):
                return "add/sub with a tensor alpha"
            # Forward-order steps for this op; appended reversed because the walk goes backward.
            if a_path:  # scores + alpha*other, scores - alpha*other
                k = alpha if o.name == "add" else -alpha
                here = [Transform("const", k * c, at=cur) if c is not None else
                        Transform("add", k, node=other, at=cur)]
            else:  # other + alpha*scores, other - alpha*scores
                k = alpha if o.name == "add" else -alpha
                here = [Transform("scale", k, at=cur),
                        Transform("const", c, at=cur) if c is not None else
                        Transform("add", 1.0, node=other, at=cur)]
            steps.extend(reversed(here))
        cur = chain_arg
    return "no scores product within reach of the softmax"


def _describe_node(node: Any) -> str:
    if not isinstance(node, Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _walk_probabilities(softmax: Node, scalar: ScalarFn):
    """From the softmax forward to the product with V. Returns (product, end, dropout_p, chain) or a reason.

    ``end`` is the product operand the probabilities arrive as, once the product has looked through
    layout ops; it has the softmax's axis order.
    """
    cur = softmax
    chain: list[Node] = []
    dropout_p = 0.0
    same_layout = {softmax}  # nodes on the path with the softmax's axis order
    transposed = False
    for _ in range(_MAX_CHAIN):
        users = _data_users(cur)
        if len(users) != 1:
            return f"the attention probabilities ({cur.name}) are used by {len(users)} ops"
        user = users[0]
        o = op(user)
        p = describe_product(user, scalar)
        if p is not None:
            ends = [x for x in (p.lhs, p.rhs) if x in same_layout]
            if len(ends) != 1:
                return "the probabilities reach the product with V through an unsupported op"
            return p, ends[0], dropout_p, chain
        if o is None:
            return f"the probabilities go to {_describe_node(user)}"
        if o.name in ("cast", "identity", "contiguous"):
            pass
        elif o.name == "dropout":
            p_val, training = o["p"], o.get("training", o.get("train"))
            if not isinstance(p_val, (int, float)) or not isinstance(training, bool):
                return "dropout with a non-constant probability or mode"
            if o.get("inplace"):
                return "in-place dropout"
            if training and p_val > 0:
                if dropout_p:
                    return "two dropouts on the probabilities"
                dropout_p = float(p_val)
        elif o.name in ("transpose", "permute"):
            transposed = True  # the product looks through it; nodes after it are in another order
        elif o.name == "reshape":
            if not _batch_reshape(user, cur):
                return "a reshape of the probabilities that changes the query or key axis"
        else:
            return f"the probabilities go to {_describe_node(user)}"
        if not transposed:
            same_layout.add(user)
        chain.append(user)
        cur = user
    return "no product with V within reach of the softmax"


def _repeat(node: Node) -> GQARepeat | None:
    """``repeat_interleave(r, dim)`` or ``x[:, :, None].expand(..r..).reshape(..)`` of a tensor."""
    o = op(node)
    if o is None:
        return None
    if o.name == "repeat_interleave":
        r, dim = o["repeats"], o["dim"]
        if isinstance(r, int) and isinstance(dim, int) and isinstance(o["input"], Node) and r > 1:
            return GQARepeat(o["input"], dim % meta(node).dim(), r)
        return None
    if o.name != "reshape":
        return None
    e = op(o["input"])
    if e is None or e.name != "expand" or not isinstance(e["input"], Node):
        return None
    u = op(e["input"])
    if u is None:
        return None
    src, inserted = None, None
    if u.name == "unsqueeze" and isinstance(u["dim"], int):
        src, inserted = u["input"], u["dim"] % meta(e["input"]).dim()
    elif u.name == "getitem" and isinstance(u["index"], tuple):
        idx = u["index"]
        full = [i for i, s in enumerate(idx) if s is None]
        ok = all(s is None or s == slice(None) for s in idx)
        if ok and len(full) == 1:
            src, inserted = u["input"], full[0]
    if src is None or inserted == 0:
        return None
    s, x, out = meta(src), meta(e["input"]), meta(node)
    axis = inserted - 1
    if x.shape[inserted] != 1:
        return None
    ratio = int(meta(o["input"]).shape[inserted])
    expected = list(s.shape)
    expected[axis] *= ratio
    if list(out.shape) != expected or ratio <= 1:
        return None
    return GQARepeat(src, axis, ratio)


def _match(softmax: Node, o, scalar: ScalarFn) -> AttentionSite | NotAttention | None:
    x = o["input"]
    if not isinstance(x, Node) or not _reaches_product(x, scalar):
        return None  # not scores of a product of two activations: not an attention candidate
    where = site_location(softmax)

    def no(reason: str) -> NotAttention:
        return NotAttention(where, softmax, reason)

    walked = _walk_scores(x, scalar)
    if isinstance(walked, str):
        return no(walked)
    sp, transforms, score_chain = walked
    if _is_weight(sp.lhs) or _is_weight(sp.rhs):
        return None
    fine = tuple(int(n) for n in meta(x).shape)  # the scores as the softmax sees them
    if meta(sp.node).dim() != len(fine):
        merged_shape = tuple(int(n) for n in meta(sp.node).shape)
        sp = split_batch(sp, "out", fine)
        if sp is None:
            return no("the scores are reshaped in a way that does not split batch axes")
        for t in transforms:
            if t.merged and t.node is not None:
                t.view = refine_shape(tuple(meta(t.node).shape), merged_shape, fine)
                if t.view is None:
                    return no("a mask or bias applied before a reshape of the scores does not follow it")
    dim = o["dim"]
    out_dims = sp.out_dims
    if not isinstance(dim, int):
        return no("softmax without an explicit dim")
    k_axis = out_dims[dim % len(out_dims)]
    in_l, in_r = k_axis in sp.lhs_dims, k_axis in sp.rhs_dims
    if in_l and in_r:
        return no(f"softmax over a batch axis ({dim})")
    q_side, k_side = ("lhs", "rhs") if in_r else ("rhs", "lhs")
    q_node, q_dims, k_node, k_dims = (sp.lhs, sp.lhs_dims, sp.rhs, sp.rhs_dims) if in_r else \
        (sp.rhs, sp.rhs_dims, sp.lhs, sp.lhs_dims)
    contracted = sp.contracted
    if len(contracted) != 1:
        return no(f"scores contract {len(contracted)} axes, attention contracts one")
    (d_axis,) = contracted
    q_free = [c for c in q_dims if c in out_dims and c not in k_dims]
    k_free = [c for c in k_dims if c in out_dims and c not in q_dims]
    if len(q_free) != 1 or k_free != [k_axis]:
        return no("the scores do not have one query axis and one key axis")
    q_axis = q_free[0]
    batch = "".join(c for c in out_dims if c not in (q_axis, k_axis))
    if any(c not in q_dims for c in batch):
        return no("the query lacks a batch axis that the keys have")

    walked = _walk_probabilities(softmax, scalar)
    if isinstance(walked, str):
        return no(walked)
    vp, p_end, dropout_p, prob_chain = walked
    if vp.bias is not None:
        return no("a bias is added to the attention output inside the product")
    p_side = "lhs" if vp.lhs is p_end else "rhs"
    if meta(p_end).dim() != len(fine):
        vp = split_batch(vp, p_side, fine)
        if vp is None:
            return no("the probabilities are reshaped in a way that does not split batch axes")
    p_dims, v_node, v_dims_local = (vp.lhs_dims, vp.rhs, vp.rhs_dims) if vp.lhs is p_end else \
        (vp.rhs_dims, vp.lhs, vp.lhs_dims)
    if len(p_dims) != len(out_dims):
        return no("the probabilities change rank before the product with V")
    to_scores = dict(zip(p_dims, out_dims))
    k_local = p_dims[out_dims.index(k_axis)]
    if vp.contracted != {k_local}:
        sm_axis = dim if dim < 0 else dim - len(out_dims)
        return no(f"softmax is over axis {sm_axis}, but the product with V contracts another axis")
    if any(c not in vp.out_dims for c in p_dims if c != k_local):
        return no("the product with V drops an axis of the probabilities")
    v_extra = [c for c in v_dims_local if c not in to_scores]
    if len(v_extra) != 1 or v_extra[0] not in vp.out_dims:
        return no("V does not have exactly one value axis")
    letters = set(out_dims) | set(d_axis)
    e_axis = next(c for c in "edfghijklmnopqrstuvwxyz" if c not in letters)
    to_scores[v_extra[0]] = e_axis
    v_dims = "".join(to_scores[c] for c in v_dims_local)
    if any(c not in batch for c in v_dims if c not in (k_axis, e_axis)):
        return no("V has an axis the scores lack")
    final_dims = "".join(to_scores[c] for c in vp.out_dims)

    site = AttentionSite(
        where=where, softmax=softmax, scores=sp, values=vp, output=vp.node,
        q=q_node, k=k_node, v=v_node, q_dims=q_dims, k_dims=k_dims, v_dims=v_dims,
        out_dims=final_dims, scores_dims=out_dims, batch=batch, q_axis=q_axis, k_axis=k_axis,
        d_axis=d_axis, e_axis=e_axis, transforms=transforms, dropout_p=dropout_p,
        out_scale=vp.scale,
        chain=score_chain[::-1] + [softmax] + prob_chain + [vp.node],
    )
    views = {role: side_views[side] for role, side_views, side in (
        ("q", sp.views, q_side), ("k", sp.views, k_side), ("v", vp.views, "rhs" if p_side == "lhs" else "lhs"),
        ("out", vp.views, "out")) if side in side_views}
    site.views = views
    for attr, node, dims in (("k_repeat", k_node, k_dims), ("v_repeat", v_node, v_dims)):
        if ("k" if attr == "k_repeat" else "v") in views:
            continue
        rep = _repeat(node)
        if rep is not None and dims[rep.axis] in batch:
            setattr(site, attr, rep)
    dtypes = {meta(q_node).dtype, meta(k_node).dtype, meta(v_node).dtype}
    if len(dtypes) != 1:
        return no(f"q, k and v differ in dtype ({', '.join(sorted(str(d) for d in dtypes))})")
    if not meta(q_node).dtype.is_floating_point:
        return no("integer attention inputs")
    return site

"""FlexAttention for masks and biases that are a fixed function of (head, q_idx, kv_idx).

What: ``rewriter::flex_attention_static`` computes ``softmax(cap*tanh(scale*q·k/cap) + bias) v`` over
the positions a boolean ``keep`` table allows, with ``torch.nn.attention.flex_attention``. The tables
come from a mask or bias that the graph computes without any user input (a document-id buffer, a
prefix-LM rule built from ``arange``, a static relative-position table): the attention pass evaluates
it once at compile time and registers it here with :func:`register`. ``mask_mod`` and ``score_mod``
are lookups into those tables, and the block mask built from ``keep`` lets the kernel skip every
block with no kept position, which is where Flex beats SDPA with a materialized mask.

Why a custom op: the tables and block masks live in this module, keyed by an integer, so the op is
opaque to Inductor and its compilation is managed here. Each registered site gets its own compiled
``flex_attention`` wrapper with its own code object (a single ``torch.compile(flex_attention)``
shared by many shapes and mods hits Dynamo's recompile limit and silently runs unfused eager
Flex), and the block mask is built once per device and shape. On CPU (where FlexAttention has no
backward) the op computes the same function from the materialized tables.

Gradients: eagerly the forward keeps FlexAttention's autograd graph (no recompute); under
torch.compile / torch.export tracing the backward recomputes the forward (see ``_flex_autograd``).

Example::

    key = register(keep=torch.ones(8, 8, dtype=torch.bool).tril(), bias=None, scale=0.125)
    out = flex_attention_static(q, k, v, key=key)   # q, k, v: (B, H, 8, D)
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass, field

import torch

from ._launch import plain_eager

__all__ = ["FlexTables", "register", "tables", "flex_attention_static", "flex_reference"]


@dataclass
class FlexTables:
    """A site's tables: ``keep`` (bool) and ``bias`` (float or None), each (Sq, Skv) or (H, Sq, Skv)."""

    keep: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None = None
    _block_masks: dict = field(default_factory=dict, repr=False)
    _compiled: dict = field(default_factory=dict, repr=False)  # kernel-option level -> compiled wrapper
    _moved: dict = field(default_factory=dict, repr=False)
    _mod_cache: dict = field(default_factory=dict, repr=False)
    _level: int = field(default=0, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = str(device)
        if key not in self._moved:
            bias = None if self.bias is None else self.bias.to(device=device, dtype=torch.float32)
            self._moved[key] = (self.keep.to(device), bias)
        return self._moved[key]


_TABLES: dict[int, FlexTables] = {}
_KEYS = itertools.count()


def register(keep: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None = None) -> int:
    """Keep a site's tables for :func:`flex_attention_static`; returns the key to call it with."""
    if keep.dtype != torch.bool or keep.dim() not in (2, 3):
        raise ValueError("keep must be a bool tensor of shape (Sq, Skv) or (H, Sq, Skv)")
    if not bool(keep.any(dim=-1).all()):
        raise ValueError("every query row must keep at least one key")
    if bias is not None and bias.shape[-2:] != keep.shape[-2:]:
        raise ValueError("bias must match keep in its last two dims")
    key = next(_KEYS)
    _TABLES[key] = FlexTables(keep.detach().cpu(), None if bias is None else bias.detach().float().cpu(),
                              float(scale), softcap)
    return key


def tables(key: int) -> FlexTables:
    if key not in _TABLES:
        raise KeyError(f"no FlexAttention tables registered under key {key}")
    return _TABLES[key]


def _mods(t: FlexTables, device: torch.device):
    """(mask_mod, score_mod or None, per-head keep) for ``device``, made once per device: the
    compiled wrapper guards on the functions it is given, so new closures per call would recompile."""
    key = str(device)
    if key not in t._mod_cache:
        t._mod_cache[key] = _make_mods(t, device)
    return t._mod_cache[key]


def _make_mods(t: FlexTables, device: torch.device):
    keep, bias = t.on(device)
    per_head_keep, per_head_bias = keep.dim() == 3, bias is not None and bias.dim() == 3
    cap = t.softcap

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[h, q_idx, kv_idx] if per_head_keep else keep[q_idx, kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if bias is not None:
            score = score + (bias[h, q_idx, kv_idx] if per_head_bias else bias[q_idx, kv_idx])
        return score

    needs_score = cap is not None or bias is not None
    return mask_mod, (score_mod if needs_score else None), per_head_keep


def _block_mask(t: FlexTables, q: torch.Tensor, k: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (str(q.device), q.shape[1], q.shape[-2], k.shape[-2])
    if key not in t._block_masks:
        mask_mod, _, per_head = _mods(t, q.device)
        t._block_masks[key] = create_block_mask(mask_mod, None, q.shape[1] if per_head else None,
                                                q.shape[-2], k.shape[-2], device=q.device)
    return t._block_masks[key]


# Inductor's default Flex block sizes can ask for more shared memory than the GPU has when the mods
# read tables (seen on H200: the backward of a D=64 site with a (H, S, S) bias table needed 272 KB
# against 227 KB). Each site then retries with these, smaller, options, once per failure.
_SMALLER_KERNEL_OPTIONS = (
    {"num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
     "num_stages": 1},
)


def _compiled(t: FlexTables, level: int = 0):
    """This site's own compiled flex_attention (own code object, so its own Dynamo cache); ``level``
    > 0 picks the smaller kernel options after a compile failure."""
    cache = t._compiled
    if level not in cache:
        from torch.nn.attention.flex_attention import flex_attention

        options = None if level == 0 else _SMALLER_KERNEL_OPTIONS[level - 1]

        def call(q, k, v, score_mod, block_mask, scale, enable_gqa):
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=enable_gqa, kernel_options=options)

        code = call.__code__.replace(co_name=f"rewriter_flex_{id(t)}_{level}")
        fn = types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)
        cache[level] = torch.compile(fn, dynamic=False, fullgraph=True)
    return cache[level]


def _out_of_resources(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "out of resource" in text or "OutOfResources" in text or "No valid triton configs" in text


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    if q.device.type != "cuda":
        # FlexAttention has no backward on CPU: there the op computes the same function from the
        # materialized tables (the reference), forward and backward.
        return flex_reference(q, k, v, key)
    t = tables(key)
    _, score_mod, _ = _mods(t, q.device)
    args = (q, k, v, score_mod, _block_mask(t, q, k), t.scale, q.shape[1] != k.shape[1])
    while True:
        try:
            return _compiled(t, t._level)(*args)
        except Exception as exc:  # noqa: BLE001 - only resource failures are retried
            if not _retry_level(t, q.device, exc):
                raise


# The op and its autograd. Eagerly, a call that needs gradients keeps Flex's own autograd graph
# from the forward (as flex_attention itself does) and the backward only runs Flex's backward. While
# torch.compile / torch.export trace it (fake or functional tensors), the forward is the opaque op
# and the backward recomputes the forward under autograd, since a compiled Flex call cannot run on
# traced tensors. (The recompute costs one extra forward: measured on H200 with the recompute
# everywhere, forward+backward ran at 0.71-0.77x hand-written Flex; with the eager path as it is
# now, 0.96-0.97x at D = 128 and 0.93x at D = 64: benchmarks/results/attention_nvidia-h200_docs.md.)
_LIB = torch.library.Library("rewriter", "FRAGMENT")
_LIB.define("flex_attention_static(Tensor q, Tensor k, Tensor v, int key) -> Tensor")


def _flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    with torch.no_grad():
        return _run(q, k, v, key).contiguous()


_LIB.impl("flex_attention_static", _flex_forward, "CompositeExplicitAutograd")


@torch.library.register_fake("rewriter::flex_attention_static", lib=_LIB)
def _(q, k, v, key):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _retry_level(t: FlexTables, device: torch.device, exc: Exception) -> bool:
    """After a failed compile (forward, or the lazily compiled backward): move the site to smaller
    kernel options if the failure was a shared-memory one and a smaller option is left."""
    if device.type != "cuda" or not _out_of_resources(exc) or t._level >= len(_SMALLER_KERNEL_OPTIONS):
        return False
    t._level += 1
    return True


def _recompute_backward(q, k, v, key, grad):
    t = tables(key)
    while True:
        try:
            with torch.enable_grad():
                qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
                out = _run(qq, kk, vv, key)
                return torch.autograd.grad(out, (qq, kk, vv), grad)
        except Exception as exc:  # noqa: BLE001 - only resource failures are retried
            if not _retry_level(t, q.device, exc):
                raise


# The traced backward is an opaque op too: inside a traced graph the recompute cannot run on the
# traced tensors (the tables are real tensors), so the graph holds this op and it recomputes when run.
_LIB.define("flex_attention_static_backward(Tensor grad, Tensor q, Tensor k, Tensor v, int key) "
            "-> (Tensor, Tensor, Tensor)")
_LIB.impl("flex_attention_static_backward",
          lambda grad, q, k, v, key: tuple(_recompute_backward(q, k, v, key, grad)), "CompositeExplicitAutograd")


@torch.library.register_fake("rewriter::flex_attention_static_backward", lib=_LIB)
def _(grad, q, k, v, key):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlexRecompute(torch.autograd.Function):
    """The traced form: the opaque op forward, the opaque recomputing backward op."""

    @staticmethod
    def forward(ctx, q, k, v, key):
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.rewriter.flex_attention_static(q, k, v, key)
        ctx.save_for_backward(q, k, v)
        ctx.key = key
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        return (*torch.ops.rewriter.flex_attention_static_backward(grad.contiguous(), q, k, v, ctx.key), None)


class _FlexKeepGraph(torch.autograd.Function):
    """The eager form: Flex's autograd graph kept from the forward, no recompute."""

    @staticmethod
    def forward(ctx, q, k, v, key):
        with torch.enable_grad():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            out = _run(qq, kk, vv, key)
        ctx.graph = (out, qq, kk, vv)
        ctx.key = key
        return out.detach().contiguous()

    @staticmethod
    def backward(ctx, grad):
        out, qq, kk, vv = ctx.graph
        ctx.graph = None
        try:
            grads = torch.autograd.grad(out, (qq, kk, vv), grad)
        except Exception as exc:  # noqa: BLE001 - Flex's backward compiles lazily; see _recompute_backward
            if not _retry_level(tables(ctx.key), qq.device, exc):
                raise
            grads = _recompute_backward(qq, kk, vv, ctx.key, grad)
        return (*grads, None)


def _traced(*tensors: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def _flex_autograd(q, k, v, key):
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.rewriter.flex_attention_static(q, k, v, key)
    if _traced(q, k, v):
        return _FlexRecompute.apply(q, k, v, key)
    return _FlexKeepGraph.apply(q, k, v, key)


_LIB.impl("flex_attention_static", _flex_autograd, "Autograd")


def _direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    """What the op's eager dispatch runs (``_flex_autograd``, then ``_flex_forward``), called
    without the dispatcher: its two trips into Python implementations cost host time on every call."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlexKeepGraph.apply(q, k, v, key)
    return _flex_forward(q, k, v, key)


def flex_attention_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key: int) -> torch.Tensor:
    """Attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Skv, D) with the tables registered under
    ``key``. Eager calls on plain tensors run the op's implementation directly; traced calls
    (Dynamo, export, dispatch modes, tensor subclasses) go through the op."""
    if plain_eager(q, k, v):
        return _direct(q, k, v, key)
    return torch.ops.rewriter.flex_attention_static(q, k, v, key)


def flex_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    """The same function with the tables materialized, in plain PyTorch (for tests)."""
    t = tables(key)
    keep, bias = t.on(q.device)
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * t.scale
    if t.softcap is not None:
        s = t.softcap * torch.tanh(s / t.softcap)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~keep, float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)

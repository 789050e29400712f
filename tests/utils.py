"""Shared checks: a rewrite fired, and the optimized model computes what the original does."""

from __future__ import annotations

import copy
import json

import torch

import rewriter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def first(out):
    """The main output of a model call: the first element of a tuple or a transformers output."""
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0] if isinstance(out, (tuple, list)) else out


def optimize(model, args, kwargs=None, **config):
    config.setdefault("inductor", False)
    return rewriter.optimize(model, args, example_kwargs=kwargs, config=rewriter.Config(**config))


def assert_rewritten(opt, n, pass_name="attention"):
    rep = opt.report
    done = rep.rewritten(pass_name)
    assert len(done) == n, str(rep)
    return done


def check_fp32(model, args, kwargs=None, n=1, **config):
    """Rewritten n sites; output within 1e-5 relative of eager (fp32)."""
    model = model.float().eval()
    opt = optimize(model, args, kwargs, **config)
    sites = assert_rewritten(opt, n)
    with torch.no_grad():
        got, want = first(opt(*args, **(kwargs or {}))), first(model(*args, **(kwargs or {})))
    assert rel(got, want) <= 1e-5, rel(got, want)
    return opt, sites


def check_low_precision(model, args, kwargs=None, n=1, dtype=torch.bfloat16):
    """In bf16/fp16 the rewrite's error against float64 is within 2x of eager's own error."""
    model = model.eval()
    ref = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    cast = lambda t, d: t.to(d) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    args64 = tuple(cast(a, torch.float64) for a in args)
    argsl = tuple(cast(a, dtype) for a in args)
    kw64 = {k: cast(v, torch.float64) for k, v in (kwargs or {}).items()}
    kwl = {k: cast(v, dtype) for k, v in (kwargs or {}).items()}
    opt = optimize(low, argsl, kwl)
    assert_rewritten(opt, n)
    with torch.no_grad():
        want = first(ref(*args64, **kw64))
        eager = first(low(*argsl, **kwl))
        got = first(opt(*argsl, **kwl))
    e_eager, e_got = rel(eager, want), rel(got, want)
    assert e_got <= 2 * e_eager + 1e-6, (e_got, e_eager)
    return e_got, e_eager


def check_grads(model, args, kwargs=None, n=1):
    """Training mode: gradients of every parameter and input match eager within fp32 tolerance."""
    model = model.float().train()
    opt = optimize(model, args, kwargs)
    assert_rewritten(opt, n)
    grads = []
    for fn in (opt, model):
        inputs = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                  for a in args]
        model.zero_grad(set_to_none=True)
        out = first(fn(*inputs, **(kwargs or {})))
        (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        g = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        g += [a.grad.clone() for a in inputs if isinstance(a, torch.Tensor) and a.grad is not None]
        grads.append(g)
    assert len(grads[0]) == len(grads[1]) and grads[0]
    # Per tensor, relative to its own norm, floored at 1% of the typical gradient norm: some
    # gradients are zero in exact arithmetic (a key bias under softmax) and only rounding remains.
    floor = 1e-2 * sum(torch.linalg.vector_norm(b.double()).item() for b in grads[1]) / len(grads[1])
    for a, b in zip(*grads):
        err = torch.linalg.vector_norm((a - b).double()).item()
        assert err <= 1e-5 * max(torch.linalg.vector_norm(b.double()).item(), floor), (err, b.norm())
    model.zero_grad(set_to_none=True)


def write_linear_table(directory, rows):
    """A synthetic measured linear table for the H200 in ``directory``: rows of (M, K, N, {variant: ms})."""
    data = [{"M": m, "K": k, "N": n, **{f"{v}_ms": t for v, t in times.items()}} for m, k, n, times in rows]
    (directory / "linear_h200.json").write_text(json.dumps({"device": "H200", "rows": data}))


def count_calls(monkeypatch, owner, name):
    """Wrap ``owner.name`` so that each call is recorded; returns the list the calls append to."""
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def recording_mode():
    """A dispatch mode that runs every op and records its name in ``.ops`` (what a call
    dispatches, as tracing would see it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return Ops()

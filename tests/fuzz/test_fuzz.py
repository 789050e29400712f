"""Fuzzing: random models of attention, FFN and linear blocks in random spellings, shapes and dtypes
go through ``optimize()``. Each must run, match eager, and have every attention block it generated
found and rewritten.

CI runs 300 cases (deterministic: derandomized). The longer run is opt-in:

    REWRITER_FUZZ_EXAMPLES=5000 REWRITER_FUZZ_RANDOM=1 python -m pytest tests/fuzz -q

A case that ever fails is added to ``REGRESSIONS`` below and runs on every CI run.
"""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, example, given, settings

import rewriter
from spec import build, model_specs

N = int(os.environ.get("REWRITER_FUZZ_EXAMPLES", "300"))
RANDOM = os.environ.get("REWRITER_FUZZ_RANDOM") == "1"

# Cases that failed once, kept as regression tests (see the module docstring).
REGRESSIONS: list[dict] = [
    # bf16, one query token: the model-level error is a handful of roundings, so "2x eager" alone
    # is noise there (eager 1.7e-3, rewritten 3.5e-3); the floor below was added for it.
    {"blocks": [{"type": "attention", "heads": 1, "kv_heads": 1, "gqa": "repeat_interleave", "head_dim": 12,
                 "product": "at", "scale": "mul_scores", "mask": "key_padding", "window": 1, "softmax": "F",
                 "upcast": False, "positive_dim": False, "dropout": False, "cross": True, "pv_einsum_out": False}],
     "batch": 1, "seq": 1, "ctx": 8, "dim": 24, "dtype": "bfloat16", "seed": 2314},
]

# Low-precision models are compared with a float64 copy: the rewritten model's error may be at most
# twice eager's, plus half a bf16 ulp (2**-9), below which whole-model errors are rounding noise.
LOW_PRECISION_FLOOR = 2.0 ** -9


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(spec: dict) -> None:
    model, args, n_attn = build(spec)
    dtype = getattr(torch, spec["dtype"])
    if dtype != torch.float32:
        ref = copy.deepcopy(model).double()
        model = model.to(dtype)
        args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    opt = rewriter.optimize(model, args, config=rewriter.Config(inductor=False))
    report = opt.report
    sites = [s for s in report.sites if s.pass_name == "attention"]
    assert len(sites) == n_attn, str(report)
    assert all(s.rewritten for s in sites), str(report)
    with torch.no_grad():
        got, want = opt(*args), model(*args)
        if dtype == torch.float32:
            assert rel(got, want) <= 1e-5, (rel(got, want), spec)
        else:
            exact = ref(*args64)
            e_eager, e_got = rel(want, exact), rel(got, exact)
            assert e_got <= 2 * e_eager + LOW_PRECISION_FLOOR, (e_got, e_eager, spec)


def _with_regressions(test):
    for case in REGRESSIONS:
        test = example(case)(test)
    return test


@settings(max_examples=N, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=list(HealthCheck))
@_with_regressions
@given(model_specs())
def test_random_models_match_eager_and_every_attention_is_rewritten(spec):
    check(spec)

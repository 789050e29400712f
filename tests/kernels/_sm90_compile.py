"""Compile this package's Gluon (Hopper) kernels for sm_90 on any machine, without a GPU.

The host function is called with CPU tensors and ``_launch.launch`` replaced by a recorder, so
its real arguments (descriptors, pointers, integers, constexprs) give the kernel's signature;
the kernel is then compiled by Triton for ``GPUTarget("cuda", 90, 32)``. Pointers and
descriptors are marked 16-byte divisible, as the launches' are."""
from __future__ import annotations

import hashlib

import torch
import triton
from triton.backends.compiler import GPUTarget

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
           torch.int32: "i32", torch.int64: "i64"}


def record(module, call):
    """The ``(fn, args, kwargs)`` of every launch ``call()`` makes through ``module._launch``."""
    seen = []

    class _Recorder:
        @staticmethod
        def launch(fn, grid, *args, **kwargs):
            seen.append((fn, args, kwargs))

    real = module._launch
    module._launch = _Recorder
    try:
        call()
    finally:
        module._launch = real
    return seen


def compile_sm90(fn, args, kwargs):
    """The compiled kernel of one recorded launch."""
    from triton.experimental.gluon._runtime import GluonASTSource

    names = fn.arg_names
    sig, constexprs, attrs = {}, {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    for i, name in enumerate(names):
        v = values[name]
        param = fn.params[i]
        if param.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = v
        elif v.__class__.__name__ == "TensorDescriptor":
            shape = ", ".join(str(s) for s in v.block_shape)
            sig[name] = f"tensordesc<{_DTYPES[v.base.dtype]}[{shape}],{v.layout!r}>"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: {type(v).__name__}")
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def digest(kernel) -> str:
    return hashlib.sha256(kernel.asm["cubin"]).hexdigest()[:16]


def launches(d: int, left: bool, alibi: bool) -> dict:
    """The recorded launch of each Gluon attention kernel for head dim ``d``, a causal mask
    (``left``: with a 64-key window) and ALiBi or not; CPU tensors, B = 1, H = 2, S = 256."""
    from rewriter.kernels import flash_attention_sm90 as sm90

    q, k, v, do = (torch.randn(1, 2, 256, d, dtype=torch.bfloat16) for _ in range(4))
    slopes = torch.rand(q.shape[1]) if alibi else None
    lo = -64 if left else 0
    lse, lse2, delta = (torch.empty(q.shape[:3]) for _ in range(3))
    calls = {
        "forward": lambda: sm90.attention_forward_sm90(q, k, v, 0.1, left, True, lo, 0,
                                                       alibi_slopes=slopes),
        "dkdv": lambda: sm90.attention_backward_dkdv_sm90(
            q, k, v, do, lse2, delta, torch.empty_like(k), torch.empty_like(v), 0.1, left, True,
            lo, 0, alibi_slopes=slopes),
        "dq": lambda: sm90.attention_backward_dq_sm90(
            q, k, v, torch.empty_like(q), do, lse, None, torch.empty_like(q), lse2, delta, 0.1,
            left, True, lo, 0, alibi_slopes=slopes),
    }
    return {name: record(sm90, call) for name, call in calls.items()}


def main(argv) -> None:
    """``python _sm90_compile.py D:LEFT:ALIBI ...`` (run with TRITON_INTERPRET unset, since the
    kernels must be decorated for compilation): one JSON line per kernel and case."""
    import json

    triton.knobs.compilation.disable_line_info = True  # digests independent of line numbers
    for case in argv:
        d, left, alibi = (int(x) for x in case.split(":"))
        for name, recorded in launches(d, bool(left), bool(alibi)).items():
            row = {"case": case, "kernel": name, "launches": len(recorded)}
            if len(recorded) == 1:
                compiled = compile_sm90(*recorded[0])
                ptx = compiled.asm["ptx"]
                row.update(wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                           shared=compiled.metadata.shared, digest=digest(compiled))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

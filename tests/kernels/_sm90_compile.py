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
           torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8",
           torch.int16: "i16"}


def record(module, call, name="_launch"):
    """The ``(fn, args, kwargs)`` of every launch ``call()`` makes through ``module.<name>``:
    the shared launch module (``launch(fn, grid, ...)``) or a launch function itself."""
    seen = []

    def launch(fn, grid, *args, **kwargs):
        seen.append((fn, args, kwargs))

    real = getattr(module, name)

    class _Recorder:  # the launch module with its ``launch`` recording instead
        def __getattr__(self, attr):
            return getattr(real, attr)

    _Recorder.launch = staticmethod(launch)
    setattr(module, name, _Recorder() if name == "_launch" else launch)
    try:
        call()
    finally:
        setattr(module, name, real)
    return seen


def compile_sm90(fn, args, kwargs):
    """The compiled kernel of one recorded launch."""
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    names = fn.arg_names
    sig, constexprs, attrs = {}, {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    for i, name in enumerate(names):
        param = fn.params[i]
        v = values[name] if name in values else param.default
        if param.is_constexpr or v is None:  # (Triton makes a None argument a constexpr too)
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
    source = GluonASTSource if type(fn).__name__.startswith("Gluon") else ASTSource
    src = source(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def digest(kernel) -> str:
    return hashlib.sha256(kernel.asm["cubin"]).hexdigest()[:16]


def resources(kernel) -> dict:
    """Registers per thread and local-memory (spill) bytes of the kernel, from ``cuobjdump
    -res-usage`` (the one Triton ships); empty if that tool is not there."""
    import os
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return {"regs": int(regs.group(1)), "local": int(local.group(1))} if regs and local else {}


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


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to get past host checks that only record a launch."""

    @property
    def is_cuda(self):
        return True


def nvfp4_launches(m: int, dtype=torch.bfloat16) -> dict:
    """The recorded launches of the NVFP4 kernels with inline PTX, for ``m`` rows of x: the MMA
    kernel on a weight in tile order with the first three of its tuning candidates and in row
    order with the first, and the GEMV
    kernel with its ``cvt.rn.f16x2.e4m3x2`` decode (K = 512, N = 256; CPU tensors, the device
    taken to be sm_90)."""
    from rewriter.kernels import nvfp4 as nv

    k, n = 512, 256
    w = nv.pack_nvfp4(torch.randn(n, k))
    x = torch.randn(m, k).to(dtype).as_subclass(_OnCuda)
    out = torch.empty(m, n, dtype=dtype)
    real = nv._capability, nv._interpreting
    nv._capability, nv._interpreting = (lambda device: (9, 0)), (lambda: False)
    try:
        found = {}
        mma = [c for c in nv._candidates(m, k, mma=True, dtype=dtype) if c.mode == "mma"][:3]
        for i, cfg in enumerate(mma):
            found[f"mma {i}"] = record(nv, lambda: nv._launch(x, nv.to_tiled(w), None, out, cfg),
                                       "_launch_kernel")
        # x laid out in fragment order first (M = 9..16): the layout kernel, then the MMA kernel.
        for i, cfg in enumerate(c for c in nv._candidates(m, k, mma=True, dtype=dtype) if c.x_frag):
            layout, kernel = record(nv, lambda: nv._launch(x, nv.to_tiled(w), None, out, cfg), "_launch_kernel")
            found[f"mma xfrag {i}"] = [kernel]
            found[f"layout xfrag {i}"] = [layout]
        # The weight in row order (as stored off Hopper, or by a caller), first candidate.
        found["mma rows"] = record(nv, lambda: nv._launch(x, w, None, out, mma[0]),
                                   "_launch_kernel")
        if m <= 4:
            gemv = nv.NVFP4GemmConfig(m, 64, 256, 1, 4, 1, mode="gemv")
            found["gemv"] = record(nv, lambda: nv._launch(x, w, None, out, gemv), "_launch_kernel")
    finally:
        nv._capability, nv._interpreting = real
    return found


def main(argv) -> None:
    """``python _sm90_compile.py D:LEFT:ALIBI ... nvfp4:M:DTYPE ...`` (run with TRITON_INTERPRET
    unset, since the kernels must be decorated for compilation): one JSON line per kernel and
    case."""
    import json

    triton.knobs.compilation.disable_line_info = True  # digests independent of line numbers
    for case in argv:
        if case.startswith("nvfp4:"):  # nvfp4:M:dtype
            _, m, dt = case.split(":")
            found = nvfp4_launches(int(m), getattr(torch, dt))
        else:  # D:LEFT:ALIBI, the Gluon attention kernels
            d, left, alibi = (int(x) for x in case.split(":"))
            found = launches(d, bool(left), bool(alibi))
        for name, recorded in found.items():
            row = {"case": case, "kernel": name, "launches": len(recorded)}
            if len(recorded) == 1:
                compiled = compile_sm90(*recorded[0])
                ptx = compiled.asm["ptx"]
                row.update(wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                           mma_sync="mma.sync.aligned.m16n8k16" in ptx,
                           cvt_e4m3="cvt.rn.f16x2.e4m3x2" in ptx,
                           # programmatic dependent launch: where the wait and the trigger are,
                           # and where the first x load from fragment order (pieces 512 apart) is
                           gdc_wait=ptx.find("griddepcontrol.wait"),
                           gdc_launch=ptx.find("griddepcontrol.launch_dependents"),
                           x_frag_load=ptx.find("+512];"),
                           shared=compiled.metadata.shared, digest=digest(compiled),
                           **resources(compiled))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

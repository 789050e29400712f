"""The kernels that only a GPU runs compile for sm_90 on this machine, with no GPU: the three
Gluon Hopper attention kernels (forward, dK/dV, dQ) and the NVFP4 kernels written in inline PTX
(the warp-MMA kernel, the GEMV kernel's E4M3 decode). Each host function's real launch arguments
are recorded and Triton compiles the kernel for the H100's target (``_sm90_compile.py``, in a
subprocess: this test session decorates kernels for the interpreter, which runs no inline PTX
and no Gluon). Catches an edit that no longer compiles, which the GPU tests would only see on a
GPU, and checks what each kernel is built on (warpgroup MMAs and TMA loads; ``mma.sync`` and
``cvt.rn.f16x2.e4m3x2``), its shared memory (within an H100 SM's 227 KB) and that no kernel
spills registers to local memory. One more test checks, from recorded launches alone, that the
Gluon host functions pass each output its own strides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rewriter.kernels import flash_attention_sm90 as sm90

_SMEM_MAX = 227 * 1024
_ATTENTION = ["128:0:0", "64:1:0", "128:0:1"]  # head dim : 64-key window : ALiBi (all causal)
_NVFP4 = ["nvfp4:1:bfloat16", "nvfp4:16:bfloat16", "nvfp4:16:float16"]  # rows of x, dtype


def _compile(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "_sm90_compile.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, script, *cases], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _common(row):
    assert row["launches"] == 1, row
    assert 0 < row["shared"] <= _SMEM_MAX, row
    assert row.get("local", 0) == 0, row  # no register spills


@pytest.mark.skipif(not sm90.HAVE_GLUON, reason="this Triton has no Gluon")
def test_gluon_attention_kernels_compile_for_sm90():
    rows = _compile(_ATTENTION)
    assert [r["kernel"] for r in rows] == ["forward", "dkdv", "dq"] * len(_ATTENTION)
    for row in rows:
        _common(row)
        assert row["wgmma"] and row["tma"], row


def test_nvfp4_inline_ptx_kernels_compile_for_sm90():
    rows = _compile(_NVFP4)
    mma = [r for r in rows if r["kernel"].startswith("mma")]
    frag = [r for r in mma if "xfrag" in r["kernel"]]
    layout = [r for r in rows if r["kernel"].startswith("layout")]
    assert len(mma) - len(frag) == 4 * len(_NVFP4)
    # M = 16: the candidates with x in fragment order, and their layout kernels.
    assert sorted({r["case"] for r in frag}) == ["nvfp4:16:bfloat16", "nvfp4:16:float16"]
    assert len(layout) == len(frag) == 2  # (K = 512: the split ones need more K tiles)
    assert [r["case"] for r in rows if r["kernel"] == "gemv"] == ["nvfp4:1:bfloat16"]
    for row in rows:
        if row in layout:  # (a plain copy: no shared memory)
            assert row["launches"] == 1 and row["local"] == 0 and not row["cvt_e4m3"], row
            continue
        _common(row)
        assert row["cvt_e4m3"], row
    for row in mma:
        assert row["mma_sync"], row
        # Overlapped with the layout kernel: the wait comes before the first x load from it.
        assert (row in frag) == (row["gdc_wait"] >= 0), row
        if row in frag:
            assert 0 <= row["gdc_wait"] < row["x_frag_load"], row
    for row in layout:
        assert row["gdc_launch"] >= 0 and row["regs"] <= 64, row


@pytest.mark.skipif(not sm90.HAVE_GLUON, reason="this Triton has no Gluon")
def test_gluon_attention_launches_pass_each_outputs_own_strides():
    # The host functions pass (batch, head, row) strides of out / dK / dV / dO / dQ, each its own:
    # outputs laid out differently from one another must each get theirs (recorded, not run).
    from tests.kernels._sm90_compile import record

    def bhsd(shape, perm):  # a (B, H, S, D) view of storage laid out in the order ``perm``
        t = torch.empty([shape[i] for i in perm], dtype=torch.bfloat16)
        return t.permute(*[perm.index(i) for i in range(4)])

    q, k, v, do = (torch.randn(2, 4, 256, 64, dtype=torch.bfloat16) for _ in range(4))
    out, dq = bhsd(q.shape, (0, 2, 1, 3)), bhsd(q.shape, (2, 0, 1, 3))
    dk, dv = bhsd(k.shape, (1, 0, 2, 3)), bhsd(k.shape, (0, 2, 1, 3))
    do = bhsd(q.shape, (1, 2, 0, 3)).copy_(do)
    lse, lse2, delta = (torch.empty(q.shape[:3]) for _ in range(3))
    calls = [
        (lambda: sm90.attention_forward_sm90(q, k, v, 0.1, False, True, 0, 0, out=out), {"o": out}),
        (lambda: sm90.attention_backward_dkdv_sm90(q, k, v, do, lse2, delta, dk, dv, 0.1, False, True, 0, 0),
         {"dk": dk, "dv": dv}),
        (lambda: sm90.attention_backward_dq_sm90(q, k, v, out, do, lse, None, dq, lse2, delta, 0.1, False,
                                                 True, 0, 0), {"o": out, "do": do, "dq": dq}),
    ]
    for call, tensors in calls:
        (fn, args, kwargs), = record(sm90, call)
        got = dict(zip(fn.arg_names, args))
        for name, t in tensors.items():
            dims = ("b", "h", "n" if name in ("dk", "dv") else "m")
            assert tuple(got[f"stride_{name}{d}"] for d in dims) == t.stride()[:3], (fn.__name__, name)


def test_nvfp4_x_frag_launches_the_layout_kernel_then_the_dependent_mma_kernel(monkeypatch):
    # x_frag 2: the layout kernel (allowed to let the next kernel start: PDL) writes 16 K elements
    # of x's dtype, and the MMA kernel reads that buffer, launched with programmatic dependent launch
    # and told so (X_FRAG 2); x_frag 1: the same without PDL; a block_m of 8 is refused.
    from rewriter.kernels import nvfp4 as nv
    from tests.kernels._sm90_compile import _OnCuda, record

    monkeypatch.setattr(nv, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(nv, "_interpreting", lambda: False)
    k, n, m = 512, 256, 12
    w = nv.to_tiled(nv.pack_nvfp4(torch.randn(n, k)))
    x = torch.randn(m, k).to(torch.bfloat16).as_subclass(_OnCuda)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    for xf in (1, 2):
        cfg = nv.NVFP4GemmConfig(16, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4, x_frag=xf)
        (f1, a1, k1), (f2, a2, k2) = record(nv, lambda: nv._launch(x, w, None, out, cfg), "_launch_kernel")
        assert f1 is nv._nvfp4_x_frag_kernel and f2 is nv._nvfp4_mma_kernel
        assert a1[0] is x and a1[2:] == (m, x.stride(0)) and k1["PDL"] == (xf == 2)
        buf = a1[1]
        assert buf.dtype == x.dtype and buf.numel() == 16 * k
        assert a2[0] is buf and k2["X_FRAG"] == xf
        assert k2.get("launch_pdl", False) == (xf == 2)
    bad = nv.NVFP4GemmConfig(8, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4, x_frag=2)
    with pytest.raises(ValueError, match="x_frag needs block_m 16"):
        nv._launch(x[:8], w, None, out[:8], bad)

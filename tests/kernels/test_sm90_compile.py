"""The kernels that only a GPU runs compile for sm_90 on this machine, with no GPU: the three
Gluon Hopper attention kernels (forward, dK/dV, dQ) and the NVFP4 kernels written in inline PTX
(the warp-MMA kernel, the GEMV kernel's E4M3 decode). Each host function's real launch arguments
are recorded and Triton compiles the kernel for the H100's target (``_sm90_compile.py``, in a
subprocess: this test session decorates kernels for the interpreter, which runs no inline PTX
and no Gluon). Catches an edit that no longer compiles, which the GPU tests would only see on a
GPU, and checks what each kernel is built on (warpgroup MMAs and TMA loads; ``mma.sync`` and
``cvt.rn.f16x2.e4m3x2``), its shared memory (within an H100 SM's 227 KB) and that no kernel
spills registers to local memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
    assert len(mma) == 4 * len(_NVFP4)
    assert [r["case"] for r in rows if r["kernel"] == "gemv"] == ["nvfp4:1:bfloat16"]
    for row in rows:
        _common(row)
        assert row["cvt_e4m3"], row
    for row in mma:
        assert row["mma_sync"], row

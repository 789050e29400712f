"""The Gluon Hopper attention kernels (forward, dK/dV, dQ) compile for sm_90 on this machine,
with no GPU: each host function's real launch arguments are recorded and Triton compiles the
kernel for the H100's target (``_sm90_compile.py``, in a subprocess: the test session decorates
kernels for the interpreter). Catches a kernel edit that no longer compiles, which the GPU tests
that run them would only see on a GPU; checks that each kernel has its warpgroup MMAs and TMA
loads and needs no more shared memory than an H100 SM's 227 KB."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rewriter.kernels import flash_attention_sm90 as sm90

pytestmark = pytest.mark.skipif(not sm90.HAVE_GLUON, reason="this Triton has no Gluon")

_SMEM_MAX = 227 * 1024
_CASES = ["128:0:0", "64:1:0", "128:0:1"]  # head dim : 64-key window : ALiBi (all causal)


def test_gluon_attention_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "_sm90_compile.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, script, *_CASES], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 * len(_CASES)
    for row in rows:
        assert row["launches"] == 1, row
        assert row["wgmma"] and row["tma"], row
        assert 0 < row["shared"] <= _SMEM_MAX, row

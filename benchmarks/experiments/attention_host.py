"""Host time per eager attention call (GPU): how long Python and the launches keep the host busy.

B = 1, H = 16, S = 1024 (env S), bf16: the GPU work is far shorter than the host's, so the time of
200 calls issued back to back, before one synchronize, is the host's time per call. For each
variant and D = 64 / 128, forward (no grad) and forward+backward through ``flash_attention``:

- with Triton's own launch path (``_launch.ENABLED = False``) and with the short path, alternated
  three times, median;
- through the op ``torch.ops.rewriter.flash_attention`` (the dispatcher), short path on;
- SDPA is_causal for scale;

then a cProfile of 200 forward+backward calls (causal and soft-cap, D = 128).

    PYTHONPATH=. python benchmarks/experiments/attention_host.py
"""
import cProfile, pstats, io, sys, os
import torch
import torch.nn.functional as F
from rewriter.kernels import flash_attention as fa
from rewriter.kernels import _launch
import _host  # beside this script

dev = "cuda"
B, H, S = 1, 16, int(os.environ.get("S", "1024"))
slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device=dev)
VAR = {
    "plain": {}, "causal": dict(causal=True),
    "alibi": dict(causal=True, alibi_slopes=slopes),
    "window": dict(causal=True, window=(511, 0)),
    "softcap": dict(causal=True, softcap=50.0),
}

def per_call(fn, n=300):
    return _host.per_call(fn, n)

def ab(fn):
    res = {True: [], False: []}
    for _ in range(3):
        for on in (False, True):
            _launch.ENABLED = on
            res[on].append(per_call(fn, 200))
    _launch.ENABLED = True
    return sorted(res[False])[1], sorted(res[True])[1]

for D in (64, 128):
    q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    do = torch.randn_like(q)
    for name, kw in VAR.items():
        def fwd():
            with torch.no_grad():
                fa.flash_attention(q, k, v, **kw)
        def fb():
            o = fa.flash_attention(q, k, v, **kw)
            torch.autograd.grad(o, (q, k, v), do)
        w = kw.get("window", (None, None))
        opargs = (D ** -0.5, bool(kw.get("causal", False)), "top_left", w[0], w[1], kw.get("alibi_slopes"),
                  kw.get("softcap"), None, 0.0, None)
        def fwd_op():
            with torch.no_grad():
                torch.ops.rewriter.flash_attention(q, k, v, *opargs)
        def fb_op():
            o, _ = torch.ops.rewriter.flash_attention(q, k, v, *opargs)
            torch.autograd.grad(o, (q, k, v), do)
        f0, f1 = ab(fwd)
        b0, b1 = ab(fb)
        fo, bo = per_call(fwd_op), per_call(fb_op)
        print(f"D={D} {name:8s} host us/call  Triton's launch / short launch / short launch through the op: fwd {f0:6.1f} / {f1:6.1f} / {fo:6.1f}   fwd+bwd {b0:7.1f} / {b1:7.1f} / {bo:7.1f}", flush=True)
    def sf():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    def sfb():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), do)
    print(f"D={D} sdpa     host us/call: fwd {per_call(sf):7.1f}  fwd+bwd {per_call(sfb):7.1f}", flush=True)
assert _launch.ENABLED
print("short launches:", _launch.LAUNCHES)

D = 128
q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
do = torch.randn_like(q)
for name in ("causal", "softcap"):
    kw = VAR[name]
    def fb():
        o = fa.flash_attention(q, k, v, **kw)
        torch.autograd.grad(o, (q, k, v), do)
    for _ in range(20):
        fb()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        fb()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    print(f"==== profile fwd+bwd {name} D=128 (200 calls)")
    print("\n".join(l[:160] for l in s.getvalue().splitlines()[:60]))

"""Where the host time of one eager attention forward+backward goes (GPU), causal and soft-cap,
B = 1, H = 16, S = 1024, D = 128: each implementation called directly, each op through the
dispatcher, the public call with autograd, a trivial autograd graph for scale; then the PyTorch
profiler's CPU table of 50 forward+backward calls. Host time per call as in attention_host.py.

    PYTHONPATH=. python benchmarks/experiments/attention_host_split.py
"""
import torch
import _host  # beside this script
from rewriter.kernels import flash_attention as fa
dev = "cuda"
B, H, S, D = 1, 16, 1024, 128
q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
do = torch.randn_like(q)

def per_call(fn, n=200):
    return _host.per_call(fn, n, rounds=5)

for name, kw in (("causal", dict(causal=True)), ("softcap", dict(causal=True, softcap=50.0))):
    out, lse = fa.attention_forward(q.detach(), k.detach(), v.detach(), D ** -0.5, True, "top_left", None, None, None, kw.get("softcap"), None, 0.0, None)
    args = (D ** -0.5, True, "top_left", None, None, None, kw.get("softcap"), None, 0.0, None)
    r = {}
    r["attention_forward (raw)"] = per_call(lambda: fa.attention_forward(q.detach(), k.detach(), v.detach(), *args))
    r["attention_backward (raw)"] = per_call(lambda: fa.attention_backward(do, None, q.detach(), k.detach(), v.detach(), out, lse, *args))
    r["op fwd no grad"] = per_call(lambda: torch.ops.rewriter.flash_attention(q.detach(), k.detach(), v.detach(), *args))
    r["op bwd"] = per_call(lambda: torch.ops.rewriter.flash_attention_backward(do, None, q.detach(), k.detach(), v.detach(), out, lse, *args))
    def fwd_grad():
        return fa.flash_attention(q, k, v, **kw)
    r["flash_attention fwd with grad (graph built)"] = per_call(fwd_grad)
    def fb():
        o = fa.flash_attention(q, k, v, **kw)
        torch.autograd.grad(o, (q, k, v), do)
    r["fwd+bwd"] = per_call(fb)
    # empty autograd: how much does the engine cost for a trivial custom graph
    def trivial():
        o = q * 1.0
        torch.autograd.grad(o, (q,), do)
    r["trivial mul + grad"] = per_call(trivial)
    for kk, vv in r.items():
        print(f"{name:8s} {kk:45s} {vv:8.1f} us", flush=True)

from torch.profiler import profile, ProfilerActivity
kw = dict(causal=True)
def fb():
    o = fa.flash_attention(q, k, v, **kw)
    torch.autograd.grad(o, (q, k, v), do)
for _ in range(20): fb()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(50): fb()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))

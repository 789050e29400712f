"""Host time per eager call of the Flex route (GPU): ``flex_attention_static`` (eager calls on
plain tensors skip the dispatcher) against the op ``torch.ops.rewriter.flex_attention_static``.

B = 1, H = 16, S = 1024, D = 64, bf16, a document mask with a causal window (tables registered as
the attention pass does). Forward (no grad) and forward+backward; 200 calls issued before one
synchronize give the host's time per call when the GPU work is shorter (its GPU time is printed
too, from a CUDA graph where it can be captured). The two paths alternate three times; medians.
Also checks that both paths give the same output and gradients.

    PYTHONPATH=. python benchmarks/experiments/flex_host.py
"""
import statistics

import torch

from _host import per_call  # beside this script
from rewriter.kernels.flex import flex_attention_static, register

dev = "cuda"
B, H, S, D = 1, 16, 1024, 64


def main():
    torch.manual_seed(0)
    i = torch.arange(S)
    docs = i * 4 // S
    keep = (docs[:, None] == docs[None, :]) & (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 512)
    key = register(keep, None, D ** -0.5)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    op = torch.ops.rewriter.flex_attention_static

    def fwd_direct():
        with torch.no_grad():
            return flex_attention_static(q, k, v, key=key)

    def fwd_op():
        with torch.no_grad():
            return op(q, k, v, key)

    def fb_direct():
        torch.autograd.grad(flex_attention_static(q, k, v, key=key), (q, k, v), do)

    def fb_op():
        torch.autograd.grad(op(q, k, v, key), (q, k, v), do)

    # Same results both ways.
    a, b = fwd_direct(), fwd_op()
    qa = [t.detach().requires_grad_() for t in (q, k, v)]
    ga = torch.autograd.grad(flex_attention_static(*qa, key=key), qa, do)
    gb = torch.autograd.grad(op(*qa, key), qa, do)
    print("same output:", torch.equal(a, b), "same gradients:", all(torch.equal(x, y) for x, y in zip(ga, gb)))

    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fwd_op()
        ev = [torch.cuda.Event(True) for _ in range(2)]
        ts = []
        for _ in range(20):
            ev[0].record()
            g.replay()
            ev[1].record()
            ev[1].synchronize()
            ts.append(ev[0].elapsed_time(ev[1]) * 1e3)
        print(f"forward GPU time (graph replay): {statistics.median(ts):.1f} us")
    except Exception as exc:  # noqa: BLE001 - the GPU time is only for scale
        print(f"forward GPU time: not captured ({type(exc).__name__}: {exc})"[:300])

    rows = {"fwd direct": [], "fwd op": [], "fwd+bwd direct": [], "fwd+bwd op": []}
    for _ in range(3):
        rows["fwd direct"].append(per_call(fwd_direct))
        rows["fwd op"].append(per_call(fwd_op))
        rows["fwd+bwd direct"].append(per_call(fb_direct, 100))
        rows["fwd+bwd op"].append(per_call(fb_op, 100))
    for name, vals in rows.items():
        print(f"{name:16s} host us per call: median {statistics.median(vals):7.1f}  "
              f"(rounds {', '.join(f'{x:.1f}' for x in vals)})", flush=True)


if __name__ == "__main__":
    main()

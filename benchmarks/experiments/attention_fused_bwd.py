"""fused one-pass backward vs the current kernels: per-kernel breakdown, sustained and spaced."""
import os, sys, time
import torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, ".")
from benchmarks.attention_sm90 import parse_row, graph_ms
from rewriter.kernels import flash_attention as fa
from rewriter.kernels import flash_attention_sm90 as g
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
torch._dynamo.config.recompile_limit = 1024
dev = "cuda"; H = 16
COMBOS = {"T/T": ("triton", "triton"), "G/G": ("gluon", "gluon"), "auto": ("auto", "auto"),
          "fused": ("triton", "fused")}
COMBOS = {n: COMBOS[n] for n in os.environ.get("COMBOS", ",".join(COMBOS)).split(",")}


def spaced_ms(fn, n=10, reps=9):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(n):
            fn()
    gr.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        time.sleep(0.03)
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); gr.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / n)
    return sorted(ts)[reps // 2]


for spec in os.environ.get("ROWS", "128:4096:alibi,128:4096:causal,128:4096:window512").split(","):
    D, S, B, causal, window, slopes, flop = parse_row(spec, dev, H)
    name = spec.split(":")[2]
    flop *= 3.5
    q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
    do = torch.randn_like(q)
    kw = dict(causal=causal, window=window, alibi_slopes=slopes)
    def mask_mod(b, h, qi, kv):
        keep = kv <= qi
        if window is not None:
            keep = keep & (kv >= qi - window[0])
        return keep
    def alibi_mod(score, b, h, qi, kv):
        return score + slopes[h] * (kv - qi)
    torch._dynamo.reset()
    bm = create_block_mask(mask_mod, None, None, S, S, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    def step(n):
        def run():
            if n == "flex":
                o = flex(q, k, v, score_mod=alibi_mod if slopes is not None else None, block_mask=bm)
            elif n == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                saved = fa.DQ_KERNEL, fa.BACKWARD_KERNEL
                fa.DQ_KERNEL, fa.BACKWARD_KERNEL = COMBOS[n]
                try:
                    return torch.autograd.grad(fa.flash_attention(q, k, v, **kw), (q, k, v), do)
                finally:
                    fa.DQ_KERNEL, fa.BACKWARD_KERNEL = saved
            return torch.autograd.grad(o, (q, k, v), do)
        return run
    names = list(COMBOS) + ["flex"] + (["sdpa"] if window is None and slopes is None else [])
    ref = step("auto")()
    for n in names:
        gr = step(n)()
        err = max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(gr, ref))
        fn = step(n)
        fn(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        parts = sorted(((e.device_time_total / 5, e.key[:30]) for e in prof.key_averages()), reverse=True)
        tot = sum(t for t, _ in parts)
        print(f"  {name} {n}: err {err:.1e} kernels {tot:.0f} us :: " + "; ".join(f"{k} {t:.0f}" for t, k in parts[:6] if t > 1), flush=True)
    res = {}
    for rnd in range(3):
        for n in names:
            res.setdefault(n, []).append(graph_ms(step(n)))
            res.setdefault(n + "_sp", []).append(spaced_ms(step(n)))
    tf = {n: flop / (sorted(t)[1] * 1e-3) / 1e12 for n, t in res.items()}
    print(f"| {name} | sustained: " + " | ".join(f"{n} {tf[n]:.0f}" for n in names) +
          " || spaced: " + " | ".join(f"{n} {tf[n + '_sp']:.0f}" for n in names) +
          f" || fused/flex {tf['fused'] / tf['flex']:.3f} spaced {tf['fused_sp'] / tf['flex_sp']:.3f}"
          f" auto/flex {tf['auto'] / tf['flex']:.3f}", flush=True)
    del q, k, v, do

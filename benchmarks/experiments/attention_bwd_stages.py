"""Per-kernel breakdown (profiler) and fwd+bwd totals for alibi / causal / window512 with:
Triton extra block shapes, Gluon dK/dV ring stages 2/3/4, Gluon dQ stages 2/4. H100 probe."""
import math, os, sys, time
import torch
import triton
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, ".")
from benchmarks.attention_sm90 import parse_row, alternate_tflops
from rewriter.kernels import flash_attention as fa
from rewriter.kernels import flash_attention_sm90 as g

EXTRA = {"dq": [(64, 64, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3)],
         "dkdv": [(64, 64, 4, 3), (64, 32, 4, 3), (32, 128, 4, 3), (64, 64, 8, 3), (32, 32, 4, 3)]}
if os.environ.get("EXTRA", "1") == "1":
    for name, kern, table in (("dq", fa._attn_bwd_dq_kernel, fa._DQ_CONFIGS),
                              ("dkdv", fa._attn_bwd_dkdv_kernel, fa._DKDV_CONFIGS)):
        for s in EXTRA[name]:
            if s not in table[128]:
                table[128].append(s)
                kern.configs.append(triton.Config({"BLOCK_M": s[0], "BLOCK_N": s[1]},
                                                  num_warps=s[2], num_stages=s[3]))

from torch.nn.attention.flex_attention import create_block_mask, flex_attention
torch._dynamo.config.recompile_limit = 1024
dev = "cuda"
H = 16
# name -> (dq kernel, dkdv kernel, dkdv stages, dq stages)
COMBOS = {"T/T": ("triton", "triton", 2, 4), "G/T": ("gluon", "triton", 2, 4),
          "T/G2": ("triton", "gluon", 2, 4), "G/G2": ("gluon", "gluon", 2, 4),
          "G/G3": ("gluon", "gluon", 3, 4), "G/G4": ("gluon", "gluon", 4, 4),
          "G2/G2": ("gluon", "gluon", 2, 2), "auto": ("auto", "auto", 2, 4)}
rows = os.environ.get("ROWS", "128:4096:alibi,128:4096:window512,128:4096:causal").split(",")
for spec in rows:
    D, S, B, causal, window, slopes, flop = parse_row(spec, dev, H)
    name = spec.split(":")[2]
    flop = 3.5 * flop
    q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3)]
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
                o = flex(q, k, v, score_mod=alibi_mod if slopes is not None else None,
                         block_mask=bm)
                return torch.autograd.grad(o, (q, k, v), do)
            saved = fa.DQ_KERNEL, fa.BACKWARD_KERNEL, dict(g._DKDV_STAGES), g._DQ_STAGES
            fa.DQ_KERNEL, fa.BACKWARD_KERNEL, st, g._DQ_STAGES = COMBOS[n]
            g._DKDV_STAGES[128] = st
            try:
                return torch.autograd.grad(fa.flash_attention(q, k, v, **kw), (q, k, v), do)
            finally:
                fa.DQ_KERNEL, fa.BACKWARD_KERNEL, g._DKDV_STAGES, g._DQ_STAGES = saved
        return run

    names = list(COMBOS) + ["flex"]
    ref = step("T/T")()
    torch.cuda.synchronize()
    print(name, "triton picks: fwd", getattr(fa._attn_fwd_kernel, "best_config", None), "| dq",
          getattr(fa._attn_bwd_dq_kernel, "best_config", None), "| dkdv", getattr(fa._attn_bwd_dkdv_kernel, "best_config", None),
          flush=True)
    for n in names:
        gr = step(n)()
        err = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                  for a, b in zip(gr, ref))
        # per-kernel breakdown
        fn = step(n)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        parts = []
        tot = 0.0
        for e in prof.key_averages():
            t = e.device_time_total / 10
            if t > 1.0:
                parts.append((t, e.key[:40]))
                tot += t
        parts.sort(reverse=True)
        print(f"  {name} {n}: err {err:.1e} total {tot:.0f} us :: " +
              "; ".join(f"{k} {t:.0f}" for t, k in parts[:6]), flush=True)
    tf = alternate_tflops({n: step(n) for n in names}, flop)
    print(f"| {name} | " + " | ".join(f"{n} {tf[n]:.0f}" for n in names) +
          f" | best/flex {max(tf[n] for n in COMBOS) / tf['flex']:.3f} |", flush=True)
    del q, k, v, do

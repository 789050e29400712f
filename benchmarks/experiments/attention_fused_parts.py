"""(1) fused kernel: where its time goes (DQ_MODE 0 full, 1 no atomics, 2 no dQ product);
(2) window512: every dQ x dK/dV Triton block shape, sustained and spaced graph time;
(3) SM clock and clock-event reasons during sustained replay (ours vs Flex)."""
import os, sys, time, threading
import torch, triton
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmarks.attention_sm90 import parse_row, graph_ms
from probe10_lib import spaced_ms
from rewriter.kernels import flash_attention as fa
from rewriter.kernels import flash_attention_sm90 as g
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
torch._dynamo.config.recompile_limit = 1024
dev = "cuda"; H = 16


def setup(spec):
    D, S, B, causal, window, slopes, flop = parse_row(spec, dev, H)
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
    def ours(mode=("auto", "auto")):
        def run():
            saved = fa.DQ_KERNEL, fa.BACKWARD_KERNEL
            fa.DQ_KERNEL, fa.BACKWARD_KERNEL = mode
            try:
                return torch.autograd.grad(fa.flash_attention(q, k, v, **kw), (q, k, v), do)
            finally:
                fa.DQ_KERNEL, fa.BACKWARD_KERNEL = saved
        return run
    fl = lambda: torch.autograd.grad(flex(q, k, v, score_mod=alibi_mod if slopes is not None else None, block_mask=bm), (q, k, v), do)
    return ours, fl, 3.5 * flop


def ktimes(fn, it=5):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(it):
            fn()
        torch.cuda.synchronize()
    return {e.key[:30]: e.device_time_total / it for e in prof.key_averages() if e.device_time_total / it > 1}


# (1)
ours, fl, flop = setup("128:4096:alibi")
for m in (0, 1, 2):
    g._FUSED_DQ_MODE = m
    print("fused mode", m, {k: round(t) for k, t in ktimes(ours(("triton", "fused"))).items()}, flush=True)
g._FUSED_DQ_MODE = 0
print("G/G", {k: round(t) for k, t in ktimes(ours(("gluon", "gluon"))).items()}, flush=True)

# (3) clocks
import pynvml
pynvml.nvmlInit()
hd = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
def clocks(fn, secs=2.0):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(10):
            fn()
    samples, stop = [], threading.Event()
    def smp():
        while not stop.is_set():
            samples.append((pynvml.nvmlDeviceGetClockInfo(hd, pynvml.NVML_CLOCK_SM),
                            pynvml.nvmlDeviceGetPowerUsage(hd) / 1000,
                            _reasons(hd)))
            time.sleep(0.02)
    th = threading.Thread(target=smp); th.start()
    t0 = time.time(); n = 0
    while time.time() - t0 < secs:
        gr.replay(); n += 1
        torch.cuda.synchronize()
    stop.set(); th.join()
    cs = sorted(x[0] for x in samples); ps = sorted(x[1] for x in samples)
    reasons = {}
    for x in samples:
        reasons[hex(x[2])] = reasons.get(hex(x[2]), 0) + 1
    return f"clock {cs[0]}/{cs[len(cs)//2]}/{cs[-1]} MHz power {ps[len(ps)//2]:.0f}/{ps[-1]:.0f} W reasons {reasons}"
print("alibi ours sustained:", clocks(ours()), flush=True)
print("alibi flex sustained:", clocks(fl), flush=True)
del ours, fl

ours, fl, flop = setup("128:4096:window512")
print("window ours sustained:", clocks(ours()), flush=True)
print("window flex sustained:", clocks(fl), flush=True)

# (2) window config sweep
DQ = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)]
KV = [(64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3)]
def pin(kern, table, cfg):
    table[128][:] = [cfg]
    kern.configs[:] = [triton.Config({"BLOCK_M": cfg[0], "BLOCK_N": cfg[1]}, num_warps=cfg[2], num_stages=cfg[3])]
    kern.cache.clear()
fl_t = graph_ms(fl); fl_s = spaced_ms(fl)
res = []
for dqc in DQ:
    for kvc in KV:
        pin(fa._attn_bwd_dq_kernel, fa._DQ_CONFIGS, dqc)
        pin(fa._attn_bwd_dkdv_kernel, fa._DKDV_CONFIGS, kvc)
        f = ours(("triton", "triton"))
        try:
            f()
            t = sorted(graph_ms(f) for _ in range(3))[1]
            sp = spaced_ms(f)
        except Exception as e:
            print("fail", dqc, kvc, type(e).__name__, str(e)[:100]); continue
        res.append((t, dqc, kvc, sp))
        print(f"dq {dqc} dkdv {kvc}: sustained {flop / t / 1e9:.0f} TF/s ({fl_t / t:.3f}x flex) spaced {flop / sp / 1e9:.0f} ({fl_s / sp:.3f}x)", flush=True)
res.sort()
print("best", res[:3], "flex", flop / fl_t / 1e9, flop / fl_s / 1e9)

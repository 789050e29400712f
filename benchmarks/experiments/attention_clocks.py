"""Where does graph time exceed the sum of kernel times? For alibi (G/G) and window512 (T/T) and
Flex: kernel durations under the profiler in eager mode and in graph replay, graph wall time,
clock and power during sustained replay."""
import math, os, sys, threading, time
import torch
import triton
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, ".")
from benchmarks.attention_sm90 import parse_row
from rewriter.kernels import flash_attention as fa
from rewriter.kernels import flash_attention_sm90 as g
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

torch._dynamo.config.recompile_limit = 1024
dev = "cuda"
H = 16


def sampler(stop, out):
    while not stop.is_set():
        try:
            out.append((torch.cuda.clock_rate(), torch.cuda.power_draw() / 1000,
                        torch.cuda.temperature()))
        except Exception as e:  # pragma: no cover
            out.append(str(e))
            return
        time.sleep(0.05)


def kernel_sum(run, iters):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    tot = 0.0
    parts = []
    for e in prof.key_averages():
        t = e.device_time_total / iters
        tot += t
        if t > 2:
            parts.append(f"{e.key[:28]} {t:.0f}")
    return tot, parts


def study(label, fn, flop):
    fn()
    torch.cuda.synchronize()
    # eager: kernel sum under profiler, and wall time per call
    eager_sum, eparts = kernel_sum(lambda: [fn() for _ in range(10)], 10)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    eager_wall = (time.perf_counter() - t0) / 20 * 1e6
    # graph of 10 calls
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(10):
            fn()
    gr.replay()
    torch.cuda.synchronize()
    graph_sum, gparts = kernel_sum(lambda: gr.replay(), 10)
    # sustained replay: wall per call, clocks and power
    samples = []
    stop = threading.Event()
    th = threading.Thread(target=sampler, args=(stop, samples))
    th.start()
    times = []
    for _ in range(60):
        st, en = torch.cuda.Event(True), torch.cuda.Event(True)
        st.record()
        gr.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / 10 * 1000)
    stop.set()
    th.join()
    times.sort()
    med = times[len(times) // 2]
    # spaced replay: one replay then 20 ms idle
    spaced = []
    for _ in range(15):
        time.sleep(0.02)
        st, en = torch.cuda.Event(True), torch.cuda.Event(True)
        st.record()
        gr.replay()
        en.record()
        en.synchronize()
        spaced.append(st.elapsed_time(en) / 10 * 1000)
    spaced.sort()
    clk = [x for x in samples if isinstance(x, tuple)]
    cs = sorted(c[0] for c in clk) if clk else [0]
    ps = sorted(c[1] for c in clk) if clk else [0]
    tf = lambda us: flop / (us * 1e-6) / 1e12
    print(f"{label}: eager kernels {eager_sum:.0f} us ({tf(eager_sum):.0f} TF/s), eager wall "
          f"{eager_wall:.0f}; graph kernels {graph_sum:.0f} ({tf(graph_sum):.0f}); graph wall "
          f"sustained {med:.0f} ({tf(med):.0f}) first {times[0]:.0f}-{times[-1]:.0f}; spaced "
          f"{spaced[len(spaced)//2]:.0f} ({tf(spaced[len(spaced)//2]):.0f}); clock MHz "
          f"{cs[0]}-{cs[len(cs)//2]}-{cs[-1]} power W {ps[len(ps)//2]:.0f}-{ps[-1]:.0f} "
          f"n={len(clk)} {samples[:1] if not clk else ''}", flush=True)
    print("   eager:", "; ".join(eparts), flush=True)
    print("   graph:", "; ".join(gparts), flush=True)


for spec in os.environ.get("ROWS", "128:4096:alibi,128:4096:window512").split(","):
    D, S, B, causal, window, slopes, flop = parse_row(spec, dev, H)
    name = spec.split(":")[2]
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
    ours = lambda: torch.autograd.grad(fa.flash_attention(q, k, v, **kw), (q, k, v), do)
    ours_fwd = lambda: fa.flash_attention(q.detach(), k.detach(), v.detach(), **kw)
    fl = lambda: torch.autograd.grad(flex(q, k, v, score_mod=alibi_mod if slopes is not None
                                          else None, block_mask=bm), (q, k, v), do)
    fl_fwd = lambda: flex(q.detach(), k.detach(), v.detach(),
                          score_mod=alibi_mod if slopes is not None else None, block_mask=bm)
    for label, fn, f in (("ours fwd+bwd", ours, 3.5 * flop), ("flex fwd+bwd", fl, 3.5 * flop),
                         ("ours fwd", ours_fwd, flop), ("flex fwd", fl_fwd, flop),
                         ("ours fwd+bwd again", ours, 3.5 * flop)):
        study(f"{name} {label}", fn, f)
    del q, k, v, do

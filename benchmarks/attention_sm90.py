"""The Gluon Hopper forward (rewriter/kernels/flash_attention_sm90.py) against the Triton forward
and SDPA: correctness over odd shapes and layouts, then GPU time (CUDA-graph replay, median) at
B*S = 16k tokens, H = 16, D = 64 / 128 (rows chosen by --rows), all in one process.

    PYTHONPATH=. python benchmarks/attention_sm90.py [--out results/attention_sm90_<dev>.md]
        [--rows 128:4096:causal,...] [--bwd-rows 128:4096:alibi,...] [--skip-check]
        [--combos auto,G/G,...] [--spaced]

``--bwd-rows`` adds forward+backward through the library op with each pair of dQ and dK/dV
kernels (Gluon or Triton) and the library's own choice (FlexAttention and SDPA beside them).
"""
import argparse
import math

import torch
import torch.nn.functional as F
import triton

from rewriter.kernels import flash_attention as fa
from rewriter.kernels import flash_attention_sm90 as g
from rewriter.kernels.nvfp4 import back_to_back_ms


def band(sq, skv, causal, align, window):
    wl, wr = (None, None) if window is None else window
    return fa._band(sq, skv, causal, align, wl, wr)


def check(dev):
    torch.manual_seed(0)
    # The GPU test's cases (odd lengths, both alignments, Sq != Skv, GQA, layouts, fp16, windows).
    from tests.kernels.test_flash_attention import SM90_CASES as cases

    worst = 0.0
    for (B, Hq, Hkv, Sq, Skv, D, causal, align, window, layout, dt) in cases:
        def mk(h, s):
            if layout == "bshd":
                return torch.randn(B, s, h, D, device=dev, dtype=dt).transpose(1, 2)
            return torch.randn(B, h, s, D, device=dev, dtype=dt)
        q, k, v = mk(Hq, Sq), mk(Hkv, Skv), mk(Hkv, Skv)
        scale = 1 / math.sqrt(D)
        ok = g.supported(q, k, v)
        hl, hr, lo, hi = band(Sq, Skv, causal, align, window)
        wl, wr = (None, None) if window is None else window
        ref_o, ref_l = fa.attention_forward(q, k, v, scale, causal, align, wl, wr, None, None,
                                            None, 0.0, None)
        o, l = g.attention_forward_sm90(q, k, v, scale, hl, hr, lo, hi)
        torch.cuda.synchronize()
        exact = fa.attention_reference(q.double(), k.double(), v.double(), scale=scale,
                                       causal=causal, causal_align=align, window=window)[0]
        e_new = ((o.double() - exact).norm() / exact.norm()).item()
        e_old = ((ref_o.double() - exact).norm() / exact.norm()).item()
        fin = torch.isfinite(ref_l)
        e_lse = (l[fin] - ref_l[fin]).abs().max().item() if fin.any() else 0.0
        same_inf = bool(((l == float("-inf")) == (ref_l == float("-inf"))).all())
        worst = max(worst, e_new / max(e_old, 1e-6))
        status = "OK" if (e_new <= 1.5 * e_old + 1e-4 and e_lse < 1e-2 and same_inf
                          and torch.isfinite(o).all()) else "FAIL"
        print(f"{status} sup={ok} B{B} H{Hq}/{Hkv} Sq{Sq} Skv{Skv} D{D} causal={causal} {align} "
              f"win={window} {layout} {dt}: err gluon {e_new:.2e} triton {e_old:.2e} "
              f"lse {e_lse:.1e}", flush=True)
    return worst


def graph_ms(fn, reps=30):
    return triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median")


def spaced_ms(fn, calls=10, reps=9, idle_s=0.03):
    """GPU time per call of a CUDA graph of ``calls`` calls, each replay after ``idle_s`` of idle
    GPU (median of ``reps``; nvfp4.back_to_back_ms). Back-to-back replays (graph_ms) settle at
    the clock that the board's power cap allows for these kernels; this measures them at the
    clock an idle GPU starts from. Both are reported: a long run sees the first, a step with
    other work between attention calls something in between."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture (autotuning, compilation)
    torch.cuda.current_stream().wait_stream(side)
    return back_to_back_ms([fn] * calls, reps=reps, idle_s=idle_s)


VARIANTS = {"causal": (True, None, False), "plain": (False, None, False),
            "window512": (True, (511, 0), False), "alibi": (True, None, True)}
DEFAULT_ROWS = ("128:4096:causal,128:4096:plain,128:4096:window512,128:4096:alibi,"
                "128:1024:causal,128:16384:causal,64:4096:causal,64:4096:alibi,64:1024:causal,"
                "64:16384:causal")


def parse_row(spec, dev, H=16, tokens=16384):
    """(D, S, B, causal, window, alibi slopes or None, forward FLOPs over visible entries) of a
    D:S:variant row."""
    D, S, name = spec.split(":")
    D, S = int(D), int(S)
    if name.startswith("window") and name not in VARIANTS:  # windowN: N keys, causal
        VARIANTS[name] = (True, (int(name[len("window"):]) - 1, 0), False)
    causal, window, alibi = VARIANTS[name]
    slopes = (torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device=dev)
              if alibi else None)
    if window is None:
        vis = S * (S + 1) / 2 if causal else S * S
    else:
        vis = sum(min(i + 1, window[0] + 1) for i in range(S))
    B = tokens // S
    return D, S, B, causal, window, slopes, 4 * B * H * D * vis


def alternate_tflops(fns, flop, timer=None):
    """TFLOP/s of each callable: three alternating rounds of CUDA-graph medians (``timer``,
    graph_ms by default), the median of the three kept."""
    timer = timer or graph_ms
    for f in fns.values():
        f()
    res = {}
    for rnd in range(3):
        for n, f in fns.items():
            res.setdefault(n, []).append(timer(f))
    return {n: flop / (sorted(t)[1] * 1e-3) / 1e12 for n, t in res.items()}


def bench(dev, lines, rows):
    H = 16
    for spec in rows.split(","):
        D, S, B, causal, window, slopes, flop = parse_row(spec, dev, H)
        name = spec.split(":")[2]
        q = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        scale = 1 / math.sqrt(D)
        hl, hr, lo, hi = band(S, S, causal, "top_left", window)
        wl, wr = (None, None) if window is None else window
        fns = {
            "gluon": lambda: g.attention_forward_sm90(q, k, v, scale, hl, hr, lo, hi,
                                                      alibi_slopes=slopes),
            "triton": lambda: fa.attention_forward(q, k, v, scale, causal, "top_left",
                                                   wl, wr, slopes, None, None, 0.0, None),
        }
        if window is None and slopes is None:
            fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        tf = alternate_tflops(fns, flop)
        row = (f"| {D} | {S} | {name} | " + " | ".join(
            f"{tf.get(n, float('nan')):.0f}" for n in ("gluon", "triton", "sdpa")) +
            f" | {tf['gluon'] / tf.get('sdpa', float('nan')):.3f} | "
            f"{tf['gluon'] / tf['triton']:.3f} |")
        print(row, flush=True)
        lines.append(row)
        del q, k, v


# Backward kernel pairs timed against each other: (dQ kernel, dK/dV kernel, stored-dS mode).
# DS: the Triton dK/dV kernel storing dS and the dQ kernel that reads it (bands only; elsewhere
# the same as T/T).
BWD_COMBOS = {"T/T": ("triton", "triton", "off"), "T/G": ("triton", "gluon", "off"),
              "G/T": ("gluon", "triton", "off"), "G/G": ("gluon", "gluon", "off"),
              "DS": ("triton", "triton", "on"), "auto": ("auto", "auto", "auto")}


def bench_backward(dev, lines, rows, combos=tuple(BWD_COMBOS), spaced=False):
    """Forward+backward through the library op with each pair of dQ and dK/dV kernels in
    ``combos`` (Gluon or Triton; the forward is the library's choice in all), FlexAttention and,
    where it has the variant, SDPA; GPU time of CUDA-graph replays, same process. ``spaced``
    adds the library's choice, Flex and SDPA timed by spaced_ms."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.recompile_limit = 1024
    fa.FORWARD_KERNEL = "auto"  # the library's forward (main pins "triton" for the forward rows)
    H = 16
    for spec in rows.split(","):
        D, S, B, causal, window, slopes, flop = parse_row(spec, dev, H)
        name = spec.split(":")[2]
        alibi = slopes is not None
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
        bm = create_block_mask(mask_mod, None, None, S, S, device=dev) if causal else None
        flex = torch.compile(flex_attention, dynamic=False)

        def call():
            return fa.flash_attention(q, k, v, **kw)

        fns = {n: call for n in combos}
        fns["flex"] = lambda: flex(q, k, v, score_mod=alibi_mod if alibi else None,
                                   block_mask=bm)
        if window is None and not alibi:
            fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def step(n):
            f = fns[n]

            def run():
                # The kernels are chosen when the backward runs, so the switch spans both.
                saved = fa.DQ_KERNEL, fa.BACKWARD_KERNEL, fa.DS_BACKWARD
                if n in BWD_COMBOS:
                    fa.DQ_KERNEL, fa.BACKWARD_KERNEL, fa.DS_BACKWARD = BWD_COMBOS[n]
                try:
                    return torch.autograd.grad(f(), (q, k, v), do)
                finally:
                    fa.DQ_KERNEL, fa.BACKWARD_KERNEL, fa.DS_BACKWARD = saved
            return run

        err = float("nan")
        other = "G/G" if "G/G" in combos else "DS" if "DS" in combos else None
        if "T/T" in combos and other:
            grads = {n: step(n)() for n in ("T/T", other)}
            err = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                      for a, b in zip(grads[other], grads["T/T"]))
            del grads

        tf = alternate_tflops({n: step(n) for n in fns}, flop)
        row = (f"| {D} | {S} | {name} | " + " | ".join(
            f"{tf.get(n, float('nan')):.0f}" for n in list(combos) + ["flex", "sdpa"]) +
            f" | {tf['auto'] / tf['flex']:.3f} | "
            f"{tf['auto'] / tf.get('sdpa', float('nan')):.3f} | {err:.1e} |")
        if spaced:
            sp = alternate_tflops({n: step(n) for n in ("auto", "flex", "sdpa") if n in fns},
                                  flop, timer=spaced_ms)
            row += (" " + " | ".join(f"{sp.get(n, float('nan')):.0f}"
                                     for n in ("auto", "flex", "sdpa"))
                    + f" | {sp['auto'] / sp['flex']:.3f} | "
                    f"{sp['auto'] / sp.get('sdpa', float('nan')):.3f} |")
        print(row, flush=True)
        lines.append(row)
        del q, k, v, do


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help="comma-separated D:S:variant, variant in " + ", ".join(VARIANTS))
    ap.add_argument("--bwd-rows", default="",
                    help="also time forward+backward with each pair of dQ and dK/dV kernels, "
                    "same format")
    ap.add_argument("--combos", default=",".join(BWD_COMBOS),
                    help="which kernel pairs the forward+backward rows time (auto is needed)")
    ap.add_argument("--spaced", action="store_true",
                    help="add auto, Flex and SDPA timed after idle gaps (spaced_ms)")
    args = ap.parse_args()
    combos = tuple(args.combos.split(","))
    if "auto" not in combos or any(c not in BWD_COMBOS for c in combos):
        ap.error(f"--combos: a comma-separated subset of {', '.join(BWD_COMBOS)} with auto")
    fa.FORWARD_KERNEL = "triton"  # the "triton" column and the check's baseline
    dev = "cuda"
    name = torch.cuda.get_device_name()
    lines = [f"# Gluon sm_90 forward vs Triton forward vs SDPA ({name}, torch {torch.__version__}, "
             f"triton {triton.__version__})", "",
             "GPU time of CUDA-graph replays (median of do_bench_cudagraph, median of 3 "
             "alternating rounds), bf16, B*S = 16384, H = 16. TFLOP/s count visible entries; "
             "alibi is causal with ALiBi slopes 2^(-8i/H) (no SDPA column)."]
    if not args.skip_check:
        w = check(dev)
        print("worst error ratio gluon/triton", w)
    if args.rows:  # the forward table only when it has rows
        lines += ["", "| D | S | variant | gluon TF/s | triton TF/s | SDPA TF/s | gluon/SDPA | "
                  "gluon/triton |", "|---|---|---|---|---|---|---|---|"]
        bench(dev, lines, args.rows)
    if args.bwd_rows:
        lines += ["", "Forward+backward (3.5x the forward's FLOPs), library op, forward as the "
                  "library chooses it; X/Y: dQ kernel X, dK/dV kernel Y, T Triton, G Gluon; "
                  "DS: T/T with the stored-dS backward (bands); auto: both as the library "
                  "chooses them; err: largest relative difference of dQ, dK, dV between G/G (or "
                  "DS where G/G is not timed) and T/T." + (
                      " Columns marked 'spaced': each CUDA-graph replay after 30 ms of idle GPU "
                      "(spaced_ms); the others back to back." if args.spaced else ""), "",
                  "| D | S | variant | " + " | ".join(f"{n} TF/s" for n in combos)
                  + " | Flex TF/s | SDPA TF/s | auto/Flex | auto/SDPA | err |" + (
                      " auto spaced | Flex spaced | SDPA spaced | auto/Flex spaced | "
                      "auto/SDPA spaced |" if args.spaced else ""),
                  "|---|---|---|" + "---|" * (len(combos) + 5 + (5 if args.spaced else 0))]
        bench_backward(dev, lines, args.bwd_rows, combos, args.spaced)
    if args.out:
        open(args.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

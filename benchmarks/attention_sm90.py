"""The Gluon Hopper forward (rewriter/kernels/flash_attention_sm90.py) against the Triton forward
and SDPA: correctness over odd shapes and layouts, then GPU time (CUDA-graph replay, median) at
B*S = 16k tokens, H = 16, S = 4096, D = 64 / 128, all in one process.

    PYTHONPATH=. python benchmarks/attention_sm90.py [--out results/attention_sm90_<dev>.md]
"""
import argparse
import math

import torch
import torch.nn.functional as F
import triton

from rewriter.kernels import flash_attention as fa
from rewriter.kernels import flash_attention_sm90 as g


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


def bench(dev, lines):
    tokens, H = 16384, 16
    for D in (128, 64):
        for S in (4096, 1024, 16384):
            B = tokens // S
            q = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn_like(q)
            v = torch.randn_like(q)
            scale = 1 / math.sqrt(D)
            for name, causal, window in (("causal", True, None), ("plain", False, None),
                                         ("window512", True, (511, 0))):
                if S != 4096 and name != "causal":
                    continue
                hl, hr, lo, hi = band(S, S, causal, "top_left", window)
                wl, wr = (None, None) if window is None else window
                if window is None:
                    vis = S * (S + 1) / 2 if causal else S * S
                else:
                    vis = sum(min(i + 1, 512) for i in range(S))
                flop = 4 * B * H * D * vis
                fns = {
                    "gluon": lambda: g.attention_forward_sm90(q, k, v, scale, hl, hr, lo, hi),
                    "triton": lambda: fa.attention_forward(q, k, v, scale, causal, "top_left",
                                                           wl, wr, None, None, None, 0.0, None),
                }
                if window is None:
                    fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                for f in fns.values():
                    f()
                res = {}
                for rnd in range(3):  # alternate rounds, keep each one's median of medians
                    for n, f in fns.items():
                        res.setdefault(n, []).append(graph_ms(f))
                tf = {n: flop / (sorted(t)[1] * 1e-3) / 1e12 for n, t in res.items()}
                row = (f"| {D} | {S} | {name} | " + " | ".join(
                    f"{tf.get(n, float('nan')):.0f}" for n in ("gluon", "triton", "sdpa")) +
                    f" | {tf['gluon'] / tf.get('sdpa', float('nan')):.3f} | "
                    f"{tf['gluon'] / tf['triton']:.3f} |")
                print(row, flush=True)
                lines.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    fa.FORWARD_KERNEL = "triton"  # the "triton" column and the check's baseline
    dev = "cuda"
    name = torch.cuda.get_device_name()
    lines = [f"# Gluon sm_90 forward vs Triton forward vs SDPA ({name}, torch {torch.__version__}, "
             f"triton {triton.__version__})", "",
             "GPU time of CUDA-graph replays (median of do_bench_cudagraph, median of 3 "
             "alternating rounds), bf16, B*S = 16384, H = 16. TFLOP/s count visible entries.", "",
             "| D | S | variant | gluon TF/s | triton TF/s | SDPA TF/s | gluon/SDPA | gluon/triton |",
             "|---|---|---|---|---|---|---|---|"]
    if not args.skip_check:
        w = check(dev)
        print("worst error ratio gluon/triton", w)
    bench(dev, lines)
    if args.out:
        open(args.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Attention throughput: rewriter's fused Triton kernel against PyTorch's options (GPU only).

For B*S = 16k tokens, H = 16, D in {64, 128} and S from 1k to 16k (bf16), times each variant
forward and forward+backward with the median of ``triton.testing.do_bench``, all baselines in the
same process:

- ``ours``: ``rewriter.kernels.flash_attention.flash_attention``;
- ``sdpa``: ``scaled_dot_product_attention`` with ``is_causal`` (plain SDPA for the non-causal row;
  for the other variants it is plain causal SDPA without the variant, a speed-of-light reference);
- ``sdpa_mask``: SDPA given the variant as a materialized (S, S) mask or (H, S, S) bias (the way
  models without a fused kernel run ALiBi or a sliding window); soft-capping has no SDPA form;
- ``flex``: FlexAttention, compiled once per (variant, shape) with its BlockMask built once;
- ``eager``: matmul, softmax in fp32, matmul (Hugging Face's eager attention).

TFLOP/s count only the visible (unmasked) score entries: forward 4*B*H*D*visible, forward+backward
3.5x that (the backward's five matmuls are 2.5x the forward's two).

Two timings per call: ``do_bench`` of the Python call as a user makes it (it includes the host's
launch overhead whenever that exceeds the GPU time, as it does for sub-millisecond calls on a slow
host), and, for ours, SDPA and FlexAttention, ``do_bench_cudagraph``, which replays the same calls
from a CUDA graph and so measures the GPU work alone.

    PYTHONPATH=. python benchmarks/attention.py            # full sweep
    PYTHONPATH=. python benchmarks/attention.py --quick    # D=128, S=4096 (target row) and 1024
    PYTHONPATH=. python benchmarks/attention.py --check    # numerics vs SDPA/fp64 first

Writes benchmarks/results/attention_<device>.md and .json.
"""

import argparse
import datetime
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
import triton

from rewriter.kernels import flash_attention as fa

TOKENS = 16384
HEADS = 16
WINDOW = 512  # keys visible per query under the sliding window, the diagonal included
SOFTCAP = 50.0
VARIANTS = ["plain", "causal", "alibi+causal", "window512+causal", "softcap+causal"]
# Not in the default list (run with --variants): 8 packed documents, causal within each. "ours" is
# rewriter's FlexAttention route (rewriter::flex_attention_static with the mask registered as a
# table, as the attention pass emits it for a document-id buffer); "flex" is FlexAttention with a
# hand-written mask_mod over the document ids.
DOCS = 8
EXTRA_VARIANTS = ["docs8+causal"]
IMPLS = ["ours", "sdpa", "sdpa_mask", "flex", "eager"]


def alibi_slopes(h, device):
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=device,
                        dtype=torch.float32)


def visible_pairs(variant, s):
    if variant == "plain":
        return s * s
    if variant.startswith("window"):
        return sum(min(i + 1, WINDOW) for i in range(s))
    if variant.startswith("docs"):
        lengths = [len(range(j * s // DOCS, (j + 1) * s // DOCS)) for j in range(DOCS)]
        return sum(n * (n + 1) // 2 for n in lengths)
    return s * (s + 1) // 2


def ours_kwargs(variant, h, device):
    if variant == "plain":
        return {}
    kw = dict(causal=True)
    if variant == "alibi+causal":
        kw["alibi_slopes"] = alibi_slopes(h, device)
    elif variant == "window512+causal":
        kw["window"] = (WINDOW - 1, 0)
    elif variant == "softcap+causal":
        kw["softcap"] = SOFTCAP
    return kw


def materialized_bias(variant, h, s, device, dtype):
    """The variant as SDPA's attn_mask: bool (S, S) or additive (1, H, S, S); None if none."""
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    if variant == "alibi+causal":
        bias = alibi_slopes(h, device)[:, None, None] * (j - i).float()
        bias = bias.masked_fill(j > i, float("-inf"))
        return bias.to(dtype)[None]
    if variant == "window512+causal":
        return (j <= i) & (j > i - WINDOW)
    if variant == "docs8+causal":
        doc = torch.arange(s, device=device) * DOCS // s
        return (j <= i) & (doc[:, None] == doc[None, :])
    return None


def flex_mods(variant, h, device, s=None):
    """(score_mod, mask_mod) of FlexAttention for a variant (``s``: the sequence length)."""
    slopes = alibi_slopes(h, device)

    def causal(b, hh, qi, kv):
        return kv <= qi

    def window(b, hh, qi, kv):
        return (kv <= qi) & (kv > qi - WINDOW)

    def alibi(score, b, hh, qi, kv):
        return score + slopes[hh] * (kv - qi)

    def softcap(score, b, hh, qi, kv):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    def documents(b, hh, qi, kv):
        return (kv <= qi) & (qi * DOCS // s == kv * DOCS // s)

    return {
        "plain": (None, None),
        "causal": (None, causal),
        "alibi+causal": (alibi, causal),
        "window512+causal": (None, window),
        "softcap+causal": (softcap, causal),
        "docs8+causal": (None, documents),
    }[variant]


def eager_attention(q, k, v, variant, bias):
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if variant == "softcap+causal":
        s = SOFTCAP * torch.tanh(s / SOFTCAP)
    s = s.float()
    if variant in ("causal", "softcap+causal"):
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    elif bias is not None:
        s = s + bias if bias.dtype != torch.bool else s.masked_fill(~bias, float("-inf"))
    return torch.softmax(s, dim=-1).to(q.dtype) @ v


def make_impls(variant, q, k, v, bias, flex_fn, flex_kw):
    h = q.shape[1]
    if variant.startswith("docs"):
        from rewriter.kernels.flex import flex_attention_static, register

        key = register(bias.cpu(), None, scale=q.shape[-1] ** -0.5)
        impls = {"ours": lambda: flex_attention_static(q, k, v, key=key)}
    else:
        kw = ours_kwargs(variant, h, q.device)
        impls = {"ours": lambda: fa.flash_attention(q, k, v, **kw)}
    impls["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=variant != "plain")
    if bias is not None:
        impls["sdpa_mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if flex_fn is not None:
        impls["flex"] = lambda: flex_fn(q, k, v, **flex_kw)
    impls["eager"] = lambda: eager_attention(q, k, v, variant, bias)
    return impls


GRAPHED = ("ours", "sdpa", "flex")
REP_MS = 100  # timing window of each measurement (--rep)


def bench(fn, q, k, v, do, mode, graph):
    """Median ms of one call, eager (graph=False) or replayed from a CUDA graph."""
    if mode == "fwd":
        step = fn
    else:
        def step():
            out = fn()
            torch.autograd.grad(out, (q, k, v), do)
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        if graph:
            return triton.testing.do_bench_cudagraph(step, rep=REP_MS, return_mode="median")
        return triton.testing.do_bench(step, warmup=25, rep=REP_MS, return_mode="median")


def tuning_log(log, **context):
    """Append the per-config timings of each of our kernels' latest autotuning, if any ran."""
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        kern = getattr(fa, name)
        timings = getattr(kern, "configs_timings", None)
        if timings:
            rows = sorted(((t[0] if isinstance(t, (list, tuple)) else t, str(c))
                           for c, t in timings.items()))
            log.append(dict(context, kernel=name, timings_ms=rows))
            print(f"    autotune {name}: " + "; ".join(f"{c} {t:.3f}ms" for t, c in rows),
                  flush=True)
            kern.configs_timings = None


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def check(device):
    """Ours vs the float64 reference at the target size, next to SDPA's (or eager's) error."""
    b, h, s, d = 4, HEADS, 4096, 128
    ok = True
    print("check: relative error vs float64 reference (batch 0, heads 0-1), bf16 inputs")
    for variant in VARIANTS:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = [torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for _ in range(3)]
        do = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g)
        bias = materialized_bias(variant, h, s, device, q.dtype)
        kw = ours_kwargs(variant, h, device)
        out = fa.flash_attention(q, k, v, **kw)
        grads = torch.autograd.grad(out, (q, k, v), do)
        if variant in ("plain", "causal"):
            base_name = "sdpa"
            base = F.scaled_dot_product_attention(q, k, v, is_causal=variant == "causal")
        elif bias is not None:
            base_name = "sdpa_mask"
            base = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            base_name = "eager"
            base = eager_attention(q, k, v, variant, bias)
        base_grads = torch.autograd.grad(base, (q, k, v), do)
        sl = (slice(0, 1), slice(0, 2))
        qs, ks, vs = [t.detach()[sl].double().requires_grad_() for t in (q, k, v)]
        kw_ref = dict(kw)
        if "alibi_slopes" in kw_ref:
            kw_ref["alibi_slopes"] = kw_ref["alibi_slopes"][:2]
        ref, _ = fa.attention_reference(qs, ks, vs, **kw_ref)
        ref_grads = torch.autograd.grad(ref, (qs, ks, vs), do[sl].double())
        for name, x, y, r in [("out", out, base, ref)] + [
                (n, gx, gy, gr) for n, gx, gy, gr in zip(("dq", "dk", "dv"), grads, base_grads,
                                                         ref_grads)]:
            e_ours, e_base = rel_err(x[sl], r), rel_err(y[sl], r)
            flag = "ok" if e_ours <= 2 * e_base + 1e-4 else "FAIL"
            ok &= flag == "ok"
            print(f"  {variant:18s} {name:3s} ours {e_ours:.2e}  {base_name} {e_base:.2e}  {flag}")
        del q, k, v, do, out, grads, base, base_grads, bias
        torch.cuda.empty_cache()
    return ok


def run(args, save):
    """Time every (shape, variant); ``save(results, tune_log, complete)`` runs after each."""
    device = "cuda"
    # Never let a recompile limit silently run FlexAttention uncompiled: raise the limits and
    # fail loudly if one is hit anyway (each (variant, shape) also starts from a fresh cache).
    for name, value in (("recompile_limit", 1024), ("accumulated_recompile_limit", 4096),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if args.shapes:
        shapes = [tuple(int(v) for v in pair.split(":")) for pair in args.shapes.split(",")]
    elif args.quick:
        shapes = [(128, 4096), (128, 1024)]
    else:
        shapes = [(d, s) for d in (64, 128) for s in (1024, 2048, 4096, 8192, 16384)]
    variants = args.variants.split(",") if args.variants else VARIANTS
    modes = ["fwd", "fwd+bwd"]
    results, tune_log = [], []
    start = time.time()
    for d, s in shapes:
        b = TOKENS // s
        for variant in variants:
            if args.budget and time.time() - start > args.budget:
                print(f"time budget of {args.budget}s spent; stopping", flush=True)
                return
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = [torch.randn(b, HEADS, s, d, device=device, dtype=torch.bfloat16,
                                   generator=g).requires_grad_() for _ in range(3)]
            do = torch.randn(b, HEADS, s, d, device=device, dtype=torch.bfloat16, generator=g)
            bias = materialized_bias(variant, HEADS, s, device, q.dtype)
            score_mod, mask_mod = flex_mods(variant, HEADS, device, s)
            # A fresh dynamo cache per (variant, shape): one compile each, and the recompile
            # limit can never silently drop FlexAttention to its unfused fallback.
            torch._dynamo.reset()
            t0 = time.time()
            block_mask = (create_block_mask(mask_mod, None, None, s, s, device=device)
                          if mask_mod is not None else None)
            flex_fn = torch.compile(flex_attention, dynamic=False)
            flex_kw = dict(score_mod=score_mod, block_mask=block_mask)
            impls = make_impls(variant, q, k, v, bias, flex_fn, flex_kw)
            flops_fwd = 4.0 * b * HEADS * d * visible_pairs(variant, s)
            for mode in modes:
                for impl in IMPLS:
                    row = dict(D=d, S=s, B=b, H=HEADS, variant=variant, mode=mode, impl=impl)
                    if impl not in impls:
                        continue
                    if impl == "eager" and args.eager_max_s and s > args.eager_max_s:
                        continue
                    flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
                    try:
                        ms = bench(impls[impl], q, k, v, do, mode, graph=False)
                        row.update(ms=ms, tflops=flops / ms * 1e-9)
                        if impl in GRAPHED:
                            ms_g = bench(impls[impl], q, k, v, do, mode, graph=True)
                            row.update(ms_graph=ms_g, tflops_graph=flops / ms_g * 1e-9)
                    except torch.OutOfMemoryError:
                        row.update(ms=None, tflops=None, note="out of memory")
                    except Exception as exc:  # a baseline that cannot run this row
                        row.update(ms=None, tflops=None, note=f"{type(exc).__name__}: {exc}"[:200])
                    torch.cuda.empty_cache()
                    if impl == "ours":
                        tuning_log(tune_log, variant=variant, D=d, S=s, mode=mode)
                    results.append(row)
                    tf, tfg = row.get("tflops"), row.get("tflops_graph")
                    print(f"D={d:3d} S={s:5d} {variant:18s} {mode:7s} {impl:9s} "
                          + (f"{row['ms']:8.3f} ms {tf:6.1f} TF/s" if tf else row.get("note", ""))
                          + (f" | graph {row['ms_graph']:8.3f} ms {tfg:6.1f} TF/s" if tfg else ""),
                          flush=True)
            print(f"  ({time.time() - t0:.0f}s for this shape and variant)", flush=True)
            del q, k, v, do, bias, block_mask, impls
            torch.cuda.empty_cache()
            save(results, tune_log, complete=False)
    save(results, tune_log, complete=True)


def table(results):
    by_key = {}
    for r in results:
        by_key.setdefault((r["D"], r["S"], r["variant"], r["mode"]), {})[r["impl"]] = r
    cols = ("| D | S | B | variant | mode | ours | sdpa | sdpa_mask | flex | eager | ours/sdpa "
            "| ours/sdpa_mask | ours/flex | graph: ours | graph: sdpa | graph: flex "
            "| graph: ours/sdpa | graph: ours/flex |")
    lines = [cols, "|" + "---|" * 18]
    for (d, s, variant, mode), row in by_key.items():
        def tf(name, key="tflops"):
            r = row.get(name)
            if r is None:
                return "-"
            return f"{r[key]:.0f}" if r.get(key) else "n/a"

        def ratio(name, key="tflops"):
            a, c = row.get("ours"), row.get(name)
            if not (a and c and a.get(key) and c.get(key)):
                return "-"
            return f"{a[key] / c[key]:.2f}x"

        b = next(iter(row.values()))["B"]
        g = "tflops_graph"
        lines.append(f"| {d} | {s} | {b} | {variant} | {mode} | {tf('ours')} | {tf('sdpa')} | "
                     f"{tf('sdpa_mask')} | {tf('flex')} | {tf('eager')} | {ratio('sdpa')} | "
                     f"{ratio('sdpa_mask')} | {ratio('flex')} | {tf('ours', g)} | "
                     f"{tf('sdpa', g)} | {tf('flex', g)} | {ratio('sdpa', g)} | "
                     f"{ratio('flex', g)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only D=128 with S=4096 and 1024")
    parser.add_argument("--check", action="store_true", help="check numerics before timing")
    parser.add_argument("--variants", default="", help="comma-separated subset of " +
                        ",".join(VARIANTS + EXTRA_VARIANTS))
    parser.add_argument("--budget", type=float, default=0.0,
                        help="stop starting new rows after this many seconds (0: no limit)")
    parser.add_argument("--shapes", default="",
                        help="comma-separated D:S pairs instead of the full sweep, e.g. 128:4096,64:1024")
    parser.add_argument("--rep", type=float, default=100.0, help="ms of timing per measurement")
    parser.add_argument("--eager-max-s", type=int, default=0,
                        help="skip the eager baseline above this sequence length (0: never skip)")
    parser.add_argument("--suffix", default="", help="added to the output file names")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    global REP_MS
    REP_MS = args.rep
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if args.check and not check("cuda"):
        sys.exit("numerical check failed")
    suffix = ("_quick" if args.quick else "") + args.suffix
    os.makedirs(args.out, exist_ok=True)

    def save(results, tune_log, complete):
        meta = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    tokens=TOKENS, heads=HEADS, dtype="bfloat16", quick=args.quick,
                    complete=complete,
                    timing=f"medians of triton.testing.do_bench(warmup=25ms, rep={REP_MS:g}ms) and "
                           f"do_bench_cudagraph(rep={REP_MS:g}ms)")
        md = (f"# Attention throughput on {name}\n\n"
              f"torch {torch.__version__}, triton {triton.__version__}, {meta['date']}; bf16, "
              f"B*S = {TOKENS} tokens, H = {HEADS}; TFLOP/s over visible score entries only "
              f"(fwd+bwd = 3.5x fwd FLOPs); {meta['timing']}. Columns without a prefix time the "
              f"Python call (host launch overhead included); 'graph:' columns replay the same "
              f"call from a CUDA graph (GPU time only)."
              + ("" if complete else " Partial: the run stopped before every row was timed.")
              + "\n\n" + table(results) + "\n")
        with open(os.path.join(args.out, f"attention_{slug}{suffix}.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, f"attention_{slug}{suffix}.json"), "w") as f:
            json.dump(dict(meta=meta, results=results, autotuning=tune_log), f, indent=1)
        if complete:
            print("\n" + md)

    run(args, save)


if __name__ == "__main__":
    main()

"""Llama-3-8B-shaped model, first 8 layers: ``rewriter.optimize`` mode "exact" against mode "fast".

The model is built on the GPU from a transformers ``LlamaConfig`` with Llama-3-8B's shapes (hidden
4096, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, rope theta 500000) truncated to 8
decoder layers, random weights, bf16, SDPA attention, no KV cache. Two calls are measured:

* prefill: batch 4 x 2048 tokens (M = 8192 rows in every linear);
* decode-like: batch 1, one token (M = 1).

For each call the model is optimized twice from the same weights, once per mode, with that call as
the example input (module passes decide from the example's shapes, so each call gets its own
optimized model), and both are timed in this run: medians of ``triton.testing.do_bench`` over
whole forward calls. Mode "fast" adds the FP8 pass, which decides per linear from the measured
table ``rewriter/data/linear_<device>.json``: run ``benchmarks/linear.py --table`` first, in the
same session. Reported: speedup of fast over exact, how many linears became FP8, the SQNR of every
converted linear on its example activation (min and median), and the agreement of the two models'
logits.

Targets: prefill fast >= 1.3x exact; decode fast not slower than exact; every converted site >= 20 dB.

    python benchmarks/llama8b.py [--layers 8] [--rep-ms 500] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rewriter  # noqa: E402
from rewriter.cost import device_slug, device_spec, linear_table  # noqa: E402

SHAPE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
             vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
CALLS = {"prefill": (4, 2048), "decode": (1, 1)}  # batch, tokens
TARGETS = {"prefill": 1.3, "decode": 1.0}
MIN_SQNR_DB = 20.0


def build(layers: int, device: str, shape: dict = SHAPE):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=layers, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval(), cfg


def median_ms(fn, rep_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 4, 25), rep=rep_ms, return_mode="median")


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def optimize(model, ids, mode: str):
    t0 = time.perf_counter()
    opt = rewriter.optimize(model, (ids,), example_kwargs={"use_cache": False}, config=rewriter.Config(mode=mode))
    return opt, time.perf_counter() - t0


def fp8_summary(report) -> dict:
    sites = [s for s in report.sites if s.pass_name == "fp8"]
    done = [s for s in sites if s.rewritten]
    sqnr = [s.checks["sqnr_db"] for s in done if "sqnr_db" in s.checks]
    reasons: dict[str, int] = {}
    for s in sites:
        if not s.rewritten:  # group reasons that differ only in their figures
            key = re.sub(r"\d+(\.\d+)?", "#", s.reason.split(" at ")[0].split(";")[0])[:100]
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "linears": len(sites),
        "converted": len(done),
        "converted_where": [s.where for s in done],
        "sqnr_db_min": min(sqnr) if sqnr else None,
        "sqnr_db_median": statistics.median(sqnr) if sqnr else None,
        "sites_under_20db": sum(x < MIN_SQNR_DB for x in sqnr),
        "rolled_back_for_sqnr": sum(not s.rewritten and "sqnr_db" in s.checks for s in sites),
        "est_speedup_by_site": {s.where: s.est_speedup for s in done},
        "skipped_reasons": reasons,
        "errors": [f"{r.name}: {r.message}" for r in report.passes if r.status == "error"],
        "notes": list(report.notes),
    }


def run_mode(model, ids: torch.Tensor, mode: str, rep_ms: int) -> tuple[dict, torch.Tensor, object]:
    """Optimize ``model`` for ``ids`` in ``mode``, time it; returns (figures, logits, report)."""
    opt, seconds = optimize(model, ids, mode)
    with torch.no_grad():
        out = logits(opt(ids, use_cache=False)).float()
        ms = median_ms(lambda: opt(ids, use_cache=False), rep_ms)
    return {f"{mode}_ms": ms, f"{mode}_optimize_s": round(seconds, 1)}, out, opt.report


def measure_call(model, vocab: int, name: str, rep_ms: int, device: str) -> dict:
    batch, tokens = CALLS[name]
    ids = torch.randint(0, vocab, (batch, tokens), device=device, generator=torch.Generator(device).manual_seed(1))
    row: dict = {"call": name, "batch": batch, "tokens": tokens}
    outs = {}
    for mode in ("exact", "fast"):
        figures, outs[mode], report = run_mode(model, ids, mode, rep_ms)
        row.update(figures)
        if mode == "fast":
            row["fp8"] = fp8_summary(report)
            print(report.render(width=160), flush=True)
        torch._dynamo.reset()  # drop the compiled model before the next one
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{name} {mode}: {row[f'{mode}_ms']:.3f} ms (optimize {row[f'{mode}_optimize_s']:.0f} s)", flush=True)
    a, b = outs["exact"], outs["fast"]
    row["speedup"] = row["exact_ms"] / row["fast_ms"]
    row["logits_rel_err"] = float((b - a).norm() / a.norm())
    row["top1_agreement"] = float((b.argmax(-1) == a.argmax(-1)).float().mean())
    return row


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            continue
        goal = TARGETS[r["call"]]
        met = r["speedup"] >= goal if r["call"] == "prefill" else r["speedup"] >= goal * 0.98
        target = f">= {goal}x" if r["call"] == "prefill" else f"not slower than {goal}x, 2% noise allowed"
        out.append(f"{r['call']}: fast {r['speedup']:.2f}x exact (target {target}): {'met' if met else 'NOT met'}")
        f = r["fp8"]
        low = f["sites_under_20db"]
        quality = ("none converted" if not f["converted"] else "every converted site >= 20 dB" if not low
                   else f"{low} converted sites under 20 dB")
        out.append(f"{r['call']}: {f['converted']} of {f['linears']} linears FP8 ({quality}); "
                   f"{f['rolled_back_for_sqnr']} left in bf16 by the SQNR floor")
    return out


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Llama-3-8B-shaped, {meta['layers']} layers: rewriter mode exact vs fast ({meta['device']})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, torchao {meta['torchao']}, {meta['date']}. "
             f"Linear table: {meta['table']}.", "",
             "bf16, random weights, SDPA attention, no KV cache; medians of triton do_bench over whole forward calls "
             "(logits of every position). Each call is optimized with itself as the example input.", "",
             "| call | batch x tokens | exact ms | fast ms | fast x | FP8 linears | SQNR min / median dB | "
             "logits rel err | top-1 agree | optimize s (exact / fast) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['call']} | - | - | - | - | - | - | - | - | error: {r['error']} |")
            continue
        f = r["fp8"]
        sq = "-" if f["sqnr_db_min"] is None else f"{f['sqnr_db_min']:.1f} / {f['sqnr_db_median']:.1f}"
        lines.append(f"| {r['call']} | {r['batch']}x{r['tokens']} | {r['exact_ms']:.3f} | {r['fast_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {f['converted']}/{f['linears']} | {sq} | {r['logits_rel_err']:.3g} | "
                     f"{r['top1_agreement']:.3f} | {r['exact_optimize_s']} / {r['fast_optimize_s']} |")
    lines += ["", "## Targets", ""] + [f"- {v}" for v in verdicts(rows)]
    lines += ["", "## Linears left in bf16 (reason: count)", ""]
    for r in rows:
        if "fp8" in r:
            lines += [f"- {r['call']}: {k}: {n}" for k, n in r["fp8"]["skipped_reasons"].items()]
            lines += [f"- {r['call']} pass error: {e}" for e in r["fp8"]["errors"]]
            lines += [f"- {r['call']} note: {n}" for n in r["fp8"]["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rep-ms", type=int, default=500)
    ap.add_argument("--calls", default="prefill,decode")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/llama8b.py needs a CUDA GPU")
    import torchao
    import transformers

    spec = device_spec(torch.device("cuda"))
    table = linear_table(spec)
    name = spec.name if spec is not None else torch.cuda.get_device_name()
    if table is None:
        print(f"warning: no measured linear table for {name}; mode fast will convert nothing. "
              "Run benchmarks/linear.py --table first.", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "layers": args.layers, "torch": torch.__version__,
            "transformers": transformers.__version__, "torchao": torchao.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "table": table.source if table is not None else "none"}
    start = time.perf_counter()
    model, cfg = build(args.layers, "cuda")
    rows = []
    for call in args.calls.split(","):
        try:
            rows.append(measure_call(model, cfg.vocab_size, call, args.rep_ms, "cuda"))
        except Exception as e:  # noqa: BLE001 - record it and go on with the other call
            traceback.print_exc()
            rows.append({"call": call, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    meta["seconds"] = round(time.perf_counter() - start, 1)
    md = render(meta, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"llama8b_{device_slug(name)}"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()

"""Whole-model inference: eager vs torch.compile (default) vs rewriter.optimize (Inductor after our rewrites).

Models are built on the GPU from transformers configs with random weights and eager attention
(what a user gets without asking for SDPA), bf16, no KV cache:

* GPT-2 124M (default GPT2Config), batch 8 x 1024;
* a Llama-shaped ~1B model: hidden 2048, 16 layers, 16 heads, 4 KV heads, intermediate 8192,
  vocab 32000, batch 4 x 2048;
* (``--models gemma2``) a Gemma-2-shaped model, 8 layers: soft-capped attention, sliding window 1024
  on alternate layers, head dim 256, batch 4 x 2048. SDPA cannot express soft-capping, so this is
  where the Triton kernel is the only fused target.

All variants are timed in the same process: medians of ``triton.testing.do_bench`` over whole
forward calls under ``torch.no_grad()``. Before timing, each variant's output is compared with eager.
Also timed: SDPA at the Llama attention shape with ``enable_gqa`` against repeating K/V, to see
which one the GQA rewrite should emit.

    python benchmarks/models.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rewriter


def build(name: str):
    from transformers import AutoModel, GPT2Config, LlamaConfig

    if name == "gpt2":
        cfg = GPT2Config()
        batch, seq = 8, 1024
    elif name == "gemma2":
        from transformers import Gemma2Config

        # Gemma-2-shaped: tanh soft-capped attention (no SDPA form) with local (window 1024) and
        # global layers alternating; 8 layers to keep the run short.
        cfg = Gemma2Config(hidden_size=2304, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=256, intermediate_size=9216, vocab_size=32000, sliding_window=1024,
                           attn_logit_softcapping=50.0, final_logit_softcapping=None, max_position_embeddings=4096)
        batch, seq = 4, 2048
    else:
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                          intermediate_size=8192, vocab_size=32000, max_position_embeddings=4096)
        batch, seq = 4, 2048
    model = AutoModel.from_config(cfg, attn_implementation="eager").to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    return model, ids


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn, rep_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 4, 25), rep=rep_ms, return_mode="median")


def run_model(name: str, rep_ms: int) -> dict:
    torch.manual_seed(0)
    model, ids = build(name)
    kwargs = {"use_cache": False}
    row: dict = {"model": name, "shape": list(ids.shape)}
    with torch.no_grad():
        want = model(ids, **kwargs).last_hidden_state
        row["eager_ms"] = bench(lambda: model(ids, **kwargs), rep_ms)

        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = torch.compile(model)
        got = compiled(ids, **kwargs).last_hidden_state
        row["compile_s"] = time.perf_counter() - t0
        row["compile_rel_err"] = rel(got, want)
        row["compile_ms"] = bench(lambda: compiled(ids, **kwargs), rep_ms)
        del compiled
        torch._dynamo.reset()

    t0 = time.perf_counter()
    fast = rewriter.optimize(model, (ids,), example_kwargs=kwargs, config=rewriter.Config())
    row["optimize_s"] = time.perf_counter() - t0
    with torch.no_grad():
        got = fast(ids, **kwargs).last_hidden_state
        row["optimize_rel_err"] = rel(got, want)
        row["optimize_ms"] = bench(lambda: fast(ids, **kwargs), rep_ms)
    rep = fast.report
    attn = [x for x in rep.sites if x.pass_name == "attention"]
    row["sites_rewritten"] = sum(x.rewritten for x in attn)
    row["sites"] = len(attn)
    row["targets"] = sorted({x.target for x in attn if x.rewritten})
    row["site_detail"] = attn[0].detail if attn else ""
    row["other_passes"] = {k: v for k, v in rep.summary()["passes"].items() if k != "attention"}
    row["est_saved_ms"] = rep.summary()["est_saved_ms"]
    row["speedup_vs_eager"] = row["eager_ms"] / row["optimize_ms"]
    row["speedup_vs_compile"] = row["compile_ms"] / row["optimize_ms"]
    print(rep.render(width=150))
    del fast, model
    torch.cuda.empty_cache()
    return row


def gqa_micro(rep_ms: int) -> dict:
    B, H, Hkv, S, D = 4, 16, 4, 2048, 128
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    r = H // Hkv
    out = {}
    with torch.no_grad():
        out["enable_gqa_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rep_ms)
        out["repeat_kv_ms"] = bench(lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True), rep_ms)
        kr, vr = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        out["pre_repeated_ms"] = bench(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), rep_ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="gpt2,llama1b")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    args = ap.parse_args()
    rep_ms = 300 if args.quick else 1500
    import transformers
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "dtype": "bfloat16", "timing": "median of triton do_bench, ms"}
    rows = [run_model(m, rep_ms) for m in args.models.split(",")]
    micro = gqa_micro(rep_ms)
    lines = [f"# Whole models, inference, bf16 ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"transformers {meta['transformers']}, {meta['date']})", "",
             "| model | batch x seq | eager ms | torch.compile ms | rewriter.optimize ms | vs eager | vs compile | "
             "attention sites rewritten (targets) | rel err vs eager (compile / optimize) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape'][0]}x{r['shape'][1]} | {r['eager_ms']:.2f} | {r['compile_ms']:.2f} | "
                     f"{r['optimize_ms']:.2f} | {r['speedup_vs_eager']:.2f}x | {r['speedup_vs_compile']:.2f}x | "
                     f"{r['sites_rewritten']}/{r['sites']} ({', '.join(r['targets'])}) | {r['compile_rel_err']:.2e} / {r['optimize_rel_err']:.2e} |")
    lines += ["", "Compile time: " + ", ".join(f"{r['model']}: torch.compile {r['compile_s']:.0f} s, optimize "
                                                f"{r['optimize_s']:.0f} s" for r in rows),
              "", "SDPA at the Llama attention shape (B 4, H 16, KV heads 4, S 2048, D 128, causal), ms: "
              + ", ".join(f"{k} {v:.3f}" for k, v in micro.items())]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = meta["device"].lower().replace("nvidia ", "").replace(" ", "-")
    tag = f"_{args.tag}" if args.tag else ""
    (out / f"models_{slug}{tag}.md").write_text(text + "\n")
    (out / f"models_{slug}{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows, "gqa_micro": micro},
                                                             indent=2, default=str))


if __name__ == "__main__":
    main()

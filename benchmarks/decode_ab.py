"""Decode step, bf16 against NVFP4, both through rewriter.optimize with CUDA graphs, timed in one
process (GPU only).

A Llama-shaped model (hidden 2048, 16 layers by default, random weights) takes one token at batch
1. Three versions of it: the original eager model, ``optimize`` in mode "exact" with
``cuda_graphs=True`` (bf16 linears), and ``optimize`` with the NVFP4 pass (cost table of the H200,
FP8 off) and ``cuda_graphs=True``. Each pair is timed with :func:`rewriter.measure.compare`
(alternating rounds, medians) in the same process, so host noise hits both sides alike.

    PYTHONPATH=. python benchmarks/decode_ab.py [--layers 16] [--out DIR]
"""

import argparse
import json
import os
import sys

import torch

import rewriter
from rewriter.measure import compare
from rewriter.targets import hf_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    model = hf_model("llama", layers=args.layers, hidden=2048, heads=16).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    bf16 = rewriter.optimize(model, (ids,), config=rewriter.Config(cuda_graphs=True))
    nvfp4 = rewriter.optimize(model, (ids,), config=rewriter.Config(
        mode="fast", enable=("nvfp4",), disable=("fp8",), cuda_graphs=True, device="H200"))
    converted = len(nvfp4.report.rewritten("nvfp4"))

    def run(m):
        return lambda: m(ids)

    rows = {}
    with torch.no_grad():
        for name, (a, b) in {"eager -> bf16 (CUDA graphs)": (model, bf16),
                             "eager -> NVFP4 (CUDA graphs)": (model, nvfp4),
                             "bf16 (CUDA graphs) -> NVFP4 (CUDA graphs)": (bf16, nvfp4)}.items():
            t = compare(run(a), run(b), torch.device("cuda"), rounds=9, round_ms=50.0)
            rows[name] = t
            print(f"{name}: {t['ms_before']:.3f} ms -> {t['ms_after']:.3f} ms ({t['speedup']:.2f}x)", flush=True)
    text = (f"# Decode step, one token, batch 1: Llama-shaped, hidden 2048, {args.layers} layers, "
            f"{torch.cuda.get_device_name()}\n\nNVFP4 linears converted: {converted} "
            f"(of {len(nvfp4.report.rewritten('nvfp4')) + len(nvfp4.report.skipped('nvfp4'))} sites).\n\n"
            "| before -> after | ms before | ms after | speedup |\n|---|---:|---:|---:|\n"
            + "".join(f"| {k} | {v['ms_before']:.3f} | {v['ms_after']:.3f} | {v['speedup']:.2f}x |\n"
                      for k, v in rows.items()))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"decode_ab_{args.layers}l.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"decode_ab_{args.layers}l.json"), "w") as f:
            json.dump({"rows": rows, "nvfp4_report": json.loads(nvfp4.report.to_json()),
                       "bf16_summary": bf16.report.summary()}, f, indent=1, default=str)


if __name__ == "__main__":
    main()

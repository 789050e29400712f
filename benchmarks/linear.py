"""GEMM times per linear variant on this GPU: the measured table the linear passes decide from.

For every (M, K, N) it times ``y = x @ W.T`` (bf16, no bias) as:

* ``bf16``: ``F.linear``;
* ``fp8``: torchao ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (row-wise
  dynamic FP8 activations and weights), the quantized ``nn.Linear`` under ``torch.compile`` as
  torchao recommends (this is what :class:`rewriter.passes.fp8.FP8Pass` produces);
* ``fp8_wo``: torchao ``Float8WeightOnlyConfig`` (FP8 weights, bf16 products), compiled, for
  M <= 128 only: with bf16 products it cannot beat bf16 once the GEMM is compute-bound;
* ``sparse24``: the weight pruned 2:4 (magnitude) and compressed with
  ``torch.sparse.to_sparse_semi_structured``, then ``F.linear``;
* ``nvfp4``: :class:`rewriter.kernels.nvfp4.NVFP4Linear` (weight-only NVFP4 Triton kernel).

Shapes: M in 1, 16, 128, 1024, 4096, 16384 (``--quick``: 1, 128, 4096) and the (K, N) of the
linears of Llama-3-8B and Llama-3.2-1B, plus their sibling groups fused into one GEMM (Q/K/V and
gate/up, bf16 and fp8 only), which the sibling-fusion cost model reads.

Every variant's output is checked before it is timed: SQNR against the bf16 product (2:4 against
the product with the pruned weight, which is what it must compute). A variant that errors or
fails the check gets no time, and the error is recorded. Times are medians of
``triton.testing.do_bench`` (L2 emptied before each repetition, inputs rotated over a few
buffers) over replays of a CUDA graph holding one call: GPU time without the host's launch and
guard overhead, as in a compiled model that is GPU-bound. Where a variant cannot be captured in a
graph its plain-call time is used and the row says so; plain-call times of every variant are kept
too (``<variant>_eager_ms``).

``--table`` writes ``rewriter/data/linear_<device>.json`` (the :class:`rewriter.cost.LinearTable`
format); results always go to ``benchmarks/results/linear_<device>.md`` / ``.json`` with the device
name and library versions.

    python benchmarks/linear.py [--quick] [--table] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rewriter.cost import device_slug, device_spec  # noqa: E402
from rewriter.validate import sqnr_db  # noqa: E402

LAYERS = {  # (K, N) of each distinct linear, per model
    "Llama-3-8B": [(4096, 4096, "q_proj/o_proj"), (4096, 1024, "k_proj/v_proj"), (4096, 14336, "gate/up_proj"),
                   (14336, 4096, "down_proj")],
    "Llama-3.2-1B": [(2048, 2048, "q_proj/o_proj"), (2048, 512, "k_proj/v_proj"), (2048, 8192, "gate/up_proj"),
                     (8192, 2048, "down_proj")],
}
FUSED = {  # sibling groups as one GEMM: (K, fused N, label, the N of its parts)
    "Llama-3-8B": [(4096, 6144, "q+k+v", [4096, 1024, 1024]), (4096, 28672, "gate+up", [14336, 14336])],
    "Llama-3.2-1B": [(2048, 3072, "q+k+v", [2048, 512, 512]), (2048, 16384, "gate+up", [8192, 8192])],
}
M_VALUES = [1, 16, 128, 1024, 4096, 16384]
QUICK_M_VALUES = [1, 128, 4096]
WEIGHT_ONLY_MAX_M = 128
# Sanity floors of the output check (dB): FP8 e4m3 products land near 30 dB, NVFP4 near 20, a
# sparse kernel against its own pruned weight near bf16 rounding (> 40). Far below means broken.
MIN_SQNR = {"fp8": 20.0, "fp8_wo": 20.0, "nvfp4": 12.0, "sparse24": 30.0}
BF16 = torch.bfloat16
DEVICE = "cuda"


def bench(fn, rep_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 3, 5), rep=rep_ms, return_mode="median")


def buffers(m: int, k: int) -> list[torch.Tensor]:
    """Inputs to rotate over: enough that together they outgrow the L2 cache (2 at least, 8 at most)."""
    nbytes = m * k * 2
    count = max(2, min(8, math.ceil((256 << 20) / nbytes)))
    return [torch.randn(m, k, device=DEVICE, dtype=BF16) for _ in range(count)]


def time_call(call, xs: list[torch.Tensor], rep_ms: int) -> dict:
    """GPU ms of ``call(x)``: replays of CUDA graphs (one per input buffer) when capture works, and
    the plain call's time in any case."""
    turn = itertools.cycle(xs)
    out = {"eager_ms": bench(lambda: call(next(turn)), rep_ms)}
    try:
        graphs = []
        for x in xs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                call(x)
            graphs.append(g)
        replay = itertools.cycle(graphs)
        out["graph_ms"] = bench(lambda: next(replay).replay(), rep_ms)
    except Exception as e:  # noqa: BLE001 - not capturable: the plain time stands
        out["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch.cuda.synchronize()
    return out


# ---- the variants: each builds a callable x -> y for one weight ---------------------------------


class Compiled:
    """``torch.compile`` of a module: automatic dynamic shapes (one compile for the first M, one
    for all later M), or, if that fails, a compile per shape."""

    def __init__(self, module: torch.nn.Module, errors: list[str], label: str):
        self.module, self.errors, self.label = module, errors, label
        self.fn = torch.compile(module)
        self.static = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.static is None:
            try:
                return self.fn(x)
            except Exception as e:  # noqa: BLE001 - fall back to static shapes, and say so
                self.errors.append(f"{self.label}: dynamic-shape compile failed, compiled per shape instead: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                self.static = torch.compile(self.module, dynamic=False)
        return self.static(x)


def make_fp8(weight: torch.Tensor, weight_only: bool, errors: list[str]):
    from rewriter.passes.fp8 import to_fp8

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=DEVICE, dtype=BF16)
    with torch.no_grad():
        lin.weight.copy_(weight)
    k, n = weight.shape[1], weight.shape[0]
    return Compiled(to_fp8(lin.eval(), weight_only=weight_only), errors,
                    f"K={k} N={n} {'fp8_wo' if weight_only else 'fp8'}")


def make_sparse24(weight: torch.Tensor):
    from torch.sparse import to_sparse_semi_structured

    from rewriter.passes.sparse24 import prune_2_4

    pruned = prune_2_4(weight)
    sparse = to_sparse_semi_structured(pruned)
    return (lambda x: F.linear(x, sparse)), pruned


def make_nvfp4(weight: torch.Tensor):
    from rewriter.kernels.nvfp4 import NVFP4Linear

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=DEVICE, dtype=BF16)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return NVFP4Linear.from_linear(lin)


@torch.no_grad()
def measure_shape(k: int, n: int, m_values: list[int], variants: list[str], rep_ms: int,
                  errors: list[str]) -> list[dict]:
    """Rows (one per M) of times and SQNRs for every variant at weight shape (N, K)."""
    # Compiled linears of every shape share nn.Linear.forward's code object, whose compile cache
    # holds recompile_limit entries before Dynamo silently runs it eagerly: start each shape from an
    # empty cache (and main() raises the limit for the per-shape fallback of Compiled).
    torch._dynamo.reset()
    torch.manual_seed(0)
    weight = (torch.randn(n, k, device=DEVICE) * k ** -0.5).to(BF16)
    built: dict[str, object] = {}
    references: dict[str, torch.Tensor] = {}
    for v in variants:
        try:
            if v == "fp8":
                built[v] = make_fp8(weight, False, errors)
            elif v == "fp8_wo":
                built[v] = make_fp8(weight, True, errors)
            elif v == "sparse24":
                built[v], references[v] = make_sparse24(weight)
            elif v == "nvfp4":
                built[v] = make_nvfp4(weight)
        except Exception as e:  # noqa: BLE001
            errors.append(f"K={k} N={n} {v}: build failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    rows = []
    for m in m_values:
        row: dict = {"M": m, "K": k, "N": n}
        xs = buffers(m, k)
        ref = F.linear(xs[0], weight)
        t = time_call(lambda x: F.linear(x, weight), xs, rep_ms)
        row["bf16_ms"] = t.get("graph_ms", t["eager_ms"])
        row["bf16_eager_ms"] = t["eager_ms"]
        for v, call in built.items():
            if v == "fp8_wo" and m > WEIGHT_ONLY_MAX_M:
                continue
            try:
                want = F.linear(xs[0], references[v]) if v in references else ref
                got = call(xs[0])
                s = sqnr_db(want, got)
                row[f"{v}_sqnr_db"] = round(s, 2) if math.isfinite(s) else s
                if not s >= MIN_SQNR[v]:
                    raise RuntimeError(f"output check failed: SQNR {s:.1f} dB < {MIN_SQNR[v]} dB")
                t = time_call(call, xs, rep_ms)
                row[f"{v}_ms"] = t.get("graph_ms", t["eager_ms"])
                row[f"{v}_eager_ms"] = t["eager_ms"]
                if "graph_error" in t:
                    row[f"{v}_timing"] = f"plain call (graph capture failed: {t['graph_error']})"
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the table
                errors.append(f"M={m} K={k} N={n} {v}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                torch.cuda.synchronize()
        rows.append(row)
        del xs
    del built, references
    torch.cuda.empty_cache()
    return rows


def meta_info() -> dict:
    import triton

    info = {"device": torch.cuda.get_device_name(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cusparselt": torch.backends.cusparselt.is_available(),
            "timing": "median of triton do_bench over CUDA-graph replays of one call (L2 emptied before each), ms"}
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001
        info["torchao"] = f"unavailable ({type(e).__name__})"
    return info


def slug() -> tuple[str, str]:
    """(device name for the table, file slug): the cost model's name where it knows the device, so
    that :func:`rewriter.cost.linear_table` finds the file."""
    spec = device_spec(torch.device("cuda"))
    name = spec.name if spec is not None else torch.cuda.get_device_name()
    return name, device_slug(name)


VARIANTS = ["fp8", "fp8_wo", "sparse24", "nvfp4"]


def fmt(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if x < 0.1 else f"{x:.3f}")


def render(meta: dict, rows: list[dict], errors: list[str], seconds: float) -> str:
    lines = [f"# Linear variants on {meta['device']}", "",
             f"torch {meta['torch']}, torchao {meta['torchao']}, triton {meta['triton']}, "
             f"cuSPARSELt {'yes' if meta['cusparselt'] else 'no'}, {meta['date']}; {seconds:.0f} s.", "",
             f"{meta['timing']}. bf16 activations and weights, no bias. Speedups are bf16 time / variant time "
             "in the same run; SQNR (dB) of each output against bf16 (2:4: against the pruned weight's product).",
             ""]
    by_model = {(k, n): (model, label) for model, shapes in LAYERS.items() for k, n, label in shapes}
    by_model.update({(k, n): (model, f"{label} fused") for model, groups in FUSED.items() for k, n, label, _ in groups})
    lines.append("| model | layer | M | K | N | bf16 ms | bf16 TFLOP/s | " +
                 " | ".join(f"{v} ms | {v} x" for v in VARIANTS) + " | SQNR fp8 / wo / 2:4 / nvfp4 |")
    lines.append("|---|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(VARIANTS) + "---|")
    for r in rows:
        model, label = by_model.get((r["K"], r["N"]), ("", ""))
        bf16 = r.get("bf16_ms")
        tflops = 2 * r["M"] * r["K"] * r["N"] / (bf16 * 1e-3) / 1e12 if bf16 else None
        cells = []
        for v in VARIANTS:
            t = r.get(f"{v}_ms")
            cells += [fmt(t), "-" if t is None or not bf16 else f"{bf16 / t:.2f}x"]
        sq = " / ".join(str(r.get(f"{v}_sqnr_db", "-")) for v in VARIANTS)
        lines.append(f"| {model} | {label} | {r['M']} | {r['K']} | {r['N']} | {fmt(bf16)} | "
                     f"{'-' if tflops is None else f'{tflops:.0f}'} | " + " | ".join(cells) + f" | {sq} |")
    lines += ["", "## Sibling groups: separate GEMMs against one fused GEMM (bf16 ms)", "",
              "| model | group | M | separate (sum) | fused | fused x |", "|---|---|---:|---:|---:|---:|"]
    times = {(r["M"], r["K"], r["N"]): r.get("bf16_ms") for r in rows}
    for model, groups in FUSED.items():
        for k, n, label, parts in groups:
            for m in sorted({r["M"] for r in rows}):
                part_times = [times.get((m, k, p)) for p in parts]
                fused = times.get((m, k, n))
                if fused is None or any(t is None for t in part_times):
                    continue
                lines.append(f"| {model} | {label} | {m} | {fmt(sum(part_times))} | {fmt(fused)} | "
                             f"{sum(part_times) / fused:.2f}x |")
    plain = [f"M={r['M']} K={r['K']} N={r['N']} {v}: {r[f'{v}_timing']}" for r in rows for v in VARIANTS
             if f"{v}_timing" in r]
    if plain or errors:
        lines += ["", "## Notes", ""] + [f"- {e}" for e in plain + errors]
    return "\n".join(lines) + "\n"


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows in :class:`rewriter.cost.LinearTable` form: M, K, N and ``<variant>_ms`` columns."""
    keys = ["bf16"] + VARIANTS
    return [{"M": r["M"], "K": r["K"], "N": r["N"], **{f"{v}_ms": r[f"{v}_ms"] for v in keys if f"{v}_ms" in r}}
            for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="M in 1, 128, 4096 only")
    ap.add_argument("--table", action="store_true", help="write rewriter/data/linear_<device>.json")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--rep-ms", type=int, default=30, help="do_bench repetition time per measurement")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/linear.py needs a CUDA GPU")
    torch._dynamo.config.recompile_limit = 64
    start = time.perf_counter()
    meta = meta_info()
    name, file_slug = slug()
    m_values = QUICK_M_VALUES if args.quick else M_VALUES
    errors: list[str] = []
    rows: list[dict] = []
    plan = [(k, n, VARIANTS) for shapes in LAYERS.values() for k, n, _ in shapes]
    plan += [(k, n, ["fp8"]) for groups in FUSED.values() for k, n, _, _ in groups]
    for k, n, variants in plan:
        t0 = time.perf_counter()
        try:
            rows += measure_shape(k, n, m_values, variants, args.rep_ms, errors)
        except Exception as e:  # noqa: BLE001 - keep the other shapes
            errors.append(f"K={k} N={n}: {type(e).__name__}: {e}")
            traceback.print_exc()
        print(f"K={k:6d} N={n:6d}: {time.perf_counter() - t0:5.1f} s", flush=True)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = render(meta, rows, errors, seconds)
    suffix = "_quick" if args.quick else ""
    (out / f"linear_{file_slug}{suffix}.md").write_text(md)
    (out / f"linear_{file_slug}{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors},
                                                                      indent=1))
    print(md)
    if args.table:
        data = Path(__file__).resolve().parent.parent / "rewriter" / "data"
        data.mkdir(exist_ok=True)
        path = data / f"linear_{file_slug}.json"
        source = "benchmarks/linear.py" + (" --quick" if args.quick else "")
        path.write_text(json.dumps({"device": name, "source": source,
                                    "meta": meta, "rows": table_rows(rows)}, indent=1))
        print(f"table written to {path}")


if __name__ == "__main__":
    main()

"""GPU benchmark of the NVFP4 weight-only linear (``rewriter.kernels.nvfp4``).

Kernel table: bf16 ``F.linear`` against the NVFP4 Triton kernel and torchao's int4 weight-only
linear, for M in (1, 4, 16, 64, 256) and (K, N) in (4096, 4096), (4096, 14336), (14336, 4096). Every
timing is the median of ``triton.testing.do_bench``, which empties the L2 cache before each
repetition, so the weight comes from device memory as it does in a model. Each shape is checked
against the PyTorch reference (output poisoned with NaN first) before it is timed.

Decode: a Llama-shaped ~1.1B model (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
8192, vocab 32000) with random bf16 weights and sdpa attention, batch 1, one new token per step at
position 128 of a static KV cache, the step captured in a CUDA graph and replayed. bf16 against the
same model with its 112 decoder linears replaced by ``NVFP4Linear`` (lm_head kept in bf16), and
with lm_head converted too; plus the SQNR of every converted linear on the activations it sees in a
128-token prefill.

``--sweep`` times a list of kernel configurations per shape instead (used to choose the candidates
the library tunes over). Results go to ``--out`` as ``nvfp4_<device>.md`` / ``.json``.

``--decode-only`` runs only the decode part and writes ``nvfp4_decode_<device>.md`` / ``.json``.

    python benchmarks/nvfp4.py [--quick] [--sweep | --decode-only] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rewriter.kernels import nvfp4 as nv  # noqa: E402
from rewriter.passes.nvfp4 import convert_linears  # noqa: E402
from rewriter.validate import sqnr_db  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
M_VALUES = [1, 4, 16, 64, 256]
QUICK_M_VALUES = [1, 16, 256]


def median_ms(fn, warmup=10, rep=50) -> float:
    """Median of do_bench: L2 emptied before each call, Python launch cost included."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(fn, warmup=10, rep=50) -> float:
    """Median of do_bench over replays of a CUDA graph holding one call of ``fn``: the GPU time of
    the call without its Python launch cost, as inside a captured decode step (L2 still emptied
    before each replay)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), warmup=5, rep=50)
    return 2 * a.numel() / ms / 1e6


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def rotating_us(fns, reps=20) -> float:
    """GPU time per call in us of back-to-back calls, each on its own copy of the weight (``fns``:
    one closure per copy): :func:`rewriter.kernels.nvfp4.back_to_back_ms`, which the library's
    tuner uses too. This is what a decode step looks like (one layer's weight after another);
    do_bench instead empties L2 before each call by writing 256 MB of zeros, which leaves the cache
    full of dirty lines that the timed call then has to write back; on the H200 that added about
    10 us to every call, ours and cuBLAS's alike (a linear fit of both against weight bytes had a
    ~10 us intercept)."""
    return nv.back_to_back_ms(fns, reps) * 1e3


def dense_copies(weight: torch.Tensor) -> list:
    """``weight`` and clones of it, together at least 3x L2, for :func:`rotating_us`."""
    return [weight] + [weight.clone() for _ in range(nv.copies_for(weight.numel() * weight.element_size()) - 1)]


def rotating_copies(weight: torch.Tensor, w: nv.NVFP4Weight) -> tuple[list, list]:
    """Copies of the bf16 weight and of its NVFP4 form for :func:`rotating_us` (the originals first)."""
    return dense_copies(weight), nv.weight_copies(w, nv.copies_for(w.nbytes()))


def checked_run(x, w, cfg=None) -> tuple[torch.Tensor, bool]:
    """Run the kernel into a NaN-poisoned output; report whether every element was written."""
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    cfg = cfg if cfg is not None else nv._select_config(x, w, None, out)
    nv._launch(x, w, None, out, cfg)
    return out, bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------------------------------
# torchao int4 weight-only baseline
# --------------------------------------------------------------------------------------------------


def make_int4(weight: torch.Tensor, notes: list[str]):
    """An int4 weight-only (group 128) linear from torchao, or None with the reason in notes."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        notes.append(f"torchao import failed: {type(e).__name__}: {e}")
        return None
    n, k = weight.shape
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    attempts = [("Int4WeightOnlyConfig(group_size=128) [default packing]", {})]
    attempts.append(
        ("Int4WeightOnlyConfig(group_size=128, int4_packing_format='tile_packed_to_4d')",
         {"int4_packing_format": "tile_packed_to_4d"})
    )
    for name, kwargs in attempts:
        try:
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(weight)
            quantize_(lin, Int4WeightOnlyConfig(group_size=128, **kwargs))
            with torch.no_grad():
                lin(x)
            torch.cuda.synchronize()
            t = lin.weight
            names, _ = t.__tensor_flatten__()
            nbytes = sum(getattr(t, a).numel() * getattr(t, a).element_size() for a in names)
            return name, lin, nbytes
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return None


# --------------------------------------------------------------------------------------------------
# Kernel table
# --------------------------------------------------------------------------------------------------


def kernel_table(m_values, notes, shapes=None) -> list[dict]:
    rows = []
    int4_note_done = False
    if torch.cuda.get_device_capability() >= (9, 0):
        notes.append("NVFP4 weights in tile order (rewriter.kernels.nvfp4.to_tiled), as NVFP4Linear stores them "
                     "on this GPU")
    for k, n in shapes or SHAPES:
        torch.manual_seed(0)
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        w = nv.pack_nvfp4(weight)
        if nv._prefers_tiles(w.packed.device, w.shape):
            w = nv.to_tiled(w)  # as NVFP4Linear stores it on this GPU
        weight_copies, w_copies = rotating_copies(weight, w)
        int4 = make_int4(weight, notes)
        if int4 is not None and not int4_note_done:
            notes.append(f"int4 baseline: torchao {int4[0]}")
            int4_note_done = True
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = nv.nvfp4_linear_reference(x.float(), w)
            y, written = checked_run(x, w)
            err = rel_err(y, ref)
            if not written or not err < 1e-2:
                raise RuntimeError(f"NVFP4 kernel wrong at M={m} K={k} N={n}: rel err {err}, all written {written}")
            cfg = nv._TUNED.get((x.device.index, nv._m_bucket(m), n, k, x.dtype))
            fns = {"bf16": lambda: F.linear(x, weight), "nvfp4": lambda: nv.nvfp4_gemm(x, w)}
            if int4 is not None:
                fns["int4"] = lambda: int4[1](x)
            row = {"M": m, "K": k, "N": n, "nvfp4_rel_err_vs_reference": err,
                   "config": None if cfg is None else cfg.__dict__}
            weight_bytes = {"bf16": 2 * n * k, "nvfp4": w.nbytes(), "int4": None if int4 is None else int4[2]}
            rot = {"bf16": [lambda wt=wt: F.linear(x, wt) for wt in weight_copies],
                   "nvfp4": [lambda wq=wq: nv.nvfp4_gemm(x, wq) for wq in w_copies]}
            with torch.no_grad():
                for name in ("bf16", "nvfp4"):
                    row[f"{name}_rot_us"] = rotating_us(rot[name])
                for name, fn in fns.items():
                    try:
                        row[f"{name}_us"] = graph_ms(fn) * 1e3
                        row[f"{name}_eager_us"] = median_ms(fn) * 1e3
                    except Exception as e:  # noqa: BLE001 - only the int4 baseline is allowed to fail here
                        if name != "int4":
                            raise
                        notes.append(f"int4 timing failed at M={m} K={k} N={n}: {type(e).__name__}: {e}")
                        int4 = None
                        continue
                    row[f"{name}_weight_GBs"] = weight_bytes[name] / row[f"{name}_us"] / 1e3
            row["speedup_vs_bf16"] = row["bf16_rot_us"] / row["nvfp4_rot_us"]
            row["flushed_speedup_vs_bf16"] = row["bf16_us"] / row["nvfp4_us"]
            row["eager_speedup_vs_bf16"] = row["bf16_eager_us"] / row["nvfp4_eager_us"]
            if int4 is not None:
                row["int4_speedup_vs_bf16"] = row["bf16_us"] / row["int4_us"]
            rows.append(row)
            print(f"M={m:4d} K={k:5d} N={n:5d} back-to-back: bf16 {row['bf16_rot_us']:6.1f} us nvfp4 "
                  f"{row['nvfp4_rot_us']:6.1f} us ({row['speedup_vs_bf16']:.2f}x) | L2 flushed: bf16 {row['bf16_us']:6.1f} "
                  f"nvfp4 {row['nvfp4_us']:6.1f} ({row['flushed_speedup_vs_bf16']:.2f}x; eager {row['bf16_eager_us']:.1f} vs "
                  f"{row['nvfp4_eager_us']:.1f})"
                  + (f"  int4 {row['int4_us']:7.1f} us" if int4 else ""), flush=True)
        del weight, w, int4, weight_copies, w_copies
        torch.cuda.empty_cache()
    return rows


def variants_table(m_values=(1, 4, 16), shapes=((4096, 14336), (14336, 4096))) -> list[dict]:
    """fp16 activations and a bias against bf16 without one: back-to-back GPU time of NVFP4 and of
    F.linear with the same dtype and bias, each checked against the reference (the kernel tunes
    separately per dtype)."""
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        weight32 = torch.randn(n, k, device="cuda") * 0.02
        w = nv.pack_nvfp4(weight32)
        if nv._prefers_tiles(w.packed.device, w.shape):
            w = nv.to_tiled(w)
        w_copies = nv.weight_copies(w, nv.copies_for(w.nbytes()))
        for dtype in (torch.bfloat16, torch.float16):
            dense = dense_copies(weight32.to(dtype))
            for has_bias in (False, True):
                bias = (torch.randn(n, device="cuda") * 0.1).to(dtype) if has_bias else None
                for m in m_values:
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    y = nv.nvfp4_gemm(x, w, bias)
                    err = rel_err(y, nv.nvfp4_linear_reference(x.float(), w, None if bias is None else bias.float()))
                    if not err < 1e-2:
                        raise RuntimeError(f"NVFP4 wrong at M={m} K={k} N={n} {dtype} bias={has_bias}: {err}")
                    with torch.no_grad():
                        t_dense = rotating_us([lambda wt=wt: F.linear(x, wt, bias) for wt in dense])
                        t_q = rotating_us([lambda wq=wq: nv.nvfp4_gemm(x, wq, bias) for wq in w_copies])
                    cfg = nv._TUNED.get((x.device.index, nv._m_bucket(m), n, k, dtype))
                    rows.append({"M": m, "K": k, "N": n, "dtype": str(dtype).replace("torch.", ""), "bias": has_bias,
                                 "dense_us": t_dense, "nvfp4_us": t_q, "speedup": t_dense / t_q, "rel_err": err,
                                 "config": None if cfg is None else cfg.__dict__})
                    print(f"M={m:3d} K={k} N={n} {rows[-1]['dtype']} bias={has_bias}: F.linear {t_dense:.1f} us, "
                          f"NVFP4 {t_q:.1f} us ({t_dense / t_q:.2f}x)", flush=True)
            del dense
        del w_copies
        torch.cuda.empty_cache()
    return rows


def kernel_label(c) -> str:
    """A configuration (as a dict) in a table: mode, tile, split, warps, and the MMA kernel's K warps,
    register cap and x layout where set."""
    if not c:
        return "-"
    return (f"{c['mode']} m{c['block_m']} n{c['block_n']} k{c['block_k']} s{c['split_k']} w{c['num_warps']}"
            + (f" kw{c['kwarps']}" if c.get("kwarps", 1) > 1 else "")
            + (f" r{c['maxnreg']}" if c.get("maxnreg") else "")
            + (f" xf{c['x_frag']}" if c.get("x_frag") else ""))


def variants_markdown(info, rows) -> str:
    lines = [f"# NVFP4 with fp16 activations and a bias on {info['device']}", "",
             f"torch {info['torch']}, triton {info['triton']}, {info['date']}. Back-to-back GPU time per call "
             "(CUDA graph over rotating weight copies, median of 20 replays), F.linear with the same "
             "activation dtype and bias in the same run; weights in tile order on compute capability 9.0+.", "",
             "| M | K | N | activations | bias | F.linear us | NVFP4 us | speedup | kernel | rel err |",
             "|---:|---:|---:|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        kern = kernel_label(r["config"])
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['dtype']} | {'yes' if r['bias'] else 'no'} | "
                     f"{r['dense_us']:.1f} | {r['nvfp4_us']:.1f} | {r['speedup']:.2f}x | {kern} | {r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Configuration sweep
# --------------------------------------------------------------------------------------------------


TILE_ONLY_FOCUSES = ("xlate2", "maxnreg", "balance")  # sweep foci timed on the tile order only


def mma_cfg(bm, groups, rw, kw, split, ahead, x_late=1) -> nv.NVFP4GemmConfig:
    """An MMA configuration of ``rw`` warps with rows of their own (``groups`` row groups of 16
    each), ``kw`` warps splitting K per row set, split-K ``split`` over the grid, L2 hint on."""
    return nv.NVFP4GemmConfig(bm, 16 * groups * rw, 128, split, rw * kw, 1, "mma", ahead, 1, "kernel", x_late, kw)


def sweep_configs(m: int, focus: str = "") -> list[nv.NVFP4GemmConfig]:
    C = nv.NVFP4GemmConfig
    if focus == "xlate" and m <= 16:
        # x read two tiles ahead with the words (x_late 0) or when used (x_late 1).
        bm = 8 if m <= 8 else 16
        return [C(bm, 16 * groups * warps, 128, split, warps, 1, "mma", ahead, 1, "kernel", x_late)
                for x_late in (1, 0) for ahead in (2, 1) for warps in (1, 2, 4) for groups in (1, 2)
                for split in (2, 4, 8)]
    if focus == "tiled" and m <= 16:
        # Every configuration on the weight in tile order (to_tiled) and in row order.
        bm = 8 if m <= 8 else 16
        cfgs = [c for c in nv._candidates(nv._m_bucket(m), 4096, mma=True) if c.mode == "mma"]
        cfgs += [mma_cfg(bm, groups, rw, kw, split, ahead)
                 for kw, split in ((1, 2), (1, 4), (1, 8), (2, 1), (4, 1)) for rw in (1, 2, 4)
                 for groups in (1, 2) for ahead in (1, 2)]
        return list(dict.fromkeys(cfgs))
    if focus == "maxnreg" and m <= 16:
        # Register caps (more warps per SM, some spills) on the best tile-order configurations.
        bm = 8 if m <= 8 else 16
        base = [C(bm, 32, 128, 1, 4, 1, "mma", a, 1, x_late=1, kwarps=4) for a in (1, 2)]
        base += [C(bm, 64, 128, 1, 8, 1, "mma", a, 1, x_late=1, kwarps=4) for a in (1, 2)]
        base += [C(bm, 64, 128, s, 2, 1, "mma", a, 1, x_late=1) for s in (4, 8) for a in (1, 2)]
        base += [C(bm, 32, 128, 4, 1, 1, "mma", 1, 1, x_late=1)]
        if m <= 8:
            base += [C(bm, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4), C(bm, 32, 128, 8, 2, 1, "mma", 1, 1, x_late=1)]
        return [dataclasses.replace(c, maxnreg=r) for c in base for r in (0, 104, 96, 80)]
    if focus == "xlate2" and m <= 16:
        # x read per chunk (x_late 2) against per tile (1), on the weight in tile order.
        bm = 8 if m <= 8 else 16
        return [mma_cfg(bm, groups, rw, kw, split, ahead, xl)
                for xl in (2, 1) for kw, split in ((1, 2), (1, 4), (1, 8), (2, 1), (4, 1)) for rw in (1, 2)
                for groups in (1, 2) for ahead in (1, 2)]
    if focus == "balance" and m <= 16:
        # K split inside the program (kwarps) and over the grid together: more, shorter programs,
        # so that the SMs get nearly equal work (benchmarks/nvfp4_balance.py), tile order.
        bm = 8 if m <= 8 else 16
        cfgs = [c for c in nv._candidates(nv._m_bucket(m), 4096, mma=True) if c.mode == "mma"]
        cfgs += [dataclasses.replace(mma_cfg(bm, groups, rw, kw, split, 1), reduce=reduce)
                 for kw, rw, groups in ((4, 1, 2), (4, 1, 1), (2, 1, 2), (4, 2, 1), (2, 2, 1))
                 for split in (2, 4) for reduce in ("kernel", "atomic")]
        return list(dict.fromkeys(cfgs))
    if focus == "kwarps" and m <= 16:
        # Warps sharing rows, K split inside the program (kwarps), against the library's candidates.
        bm = 8 if m <= 8 else 16
        cfgs = [c for c in nv._candidates(nv._m_bucket(m), 4096, mma=True) if c.mode == "mma"]
        cfgs += [mma_cfg(bm, groups, rw, kw, split, ahead)
                 for kw in (2, 4) for rw in (1, 2, 4) for groups in (1, 2) for split in (1, 2)
                 for ahead in (1, 2) if ahead == 1 or groups == 1]
        # Deeper rings of tiles in flight (ahead >= 3), with and without the in-program K split.
        cfgs += [mma_cfg(bm, groups, rw, kw, split, ahead)
                 for kw, split in ((1, 2), (1, 4), (2, 1), (2, 2), (4, 1)) for rw in (1, 2, 4)
                 for groups in (1, 2) for ahead in (3, 4, 6) if groups == 1 or ahead == 3]
        return cfgs
    if m <= 16:
        bm = 8 if m <= 8 else 16
        cfgs = [C(bm, 16 * groups * warps, 128, split, warps, 1, "mma", 2, 1, reduce)
                for warps in (1, 2, 4) for groups in (1, 2) for split in (2, 4, 8, 16)
                for reduce in ("kernel", "atomic")]
        cfgs += [C(bm, 16 * groups, 128, 1, 1, 1, "mma", 2, 1) for groups in (1, 2)]
        if m <= 4:
            bg = nv._m_bucket(m)
            cfgs += [C(bg, 64, 256, 4, 4, 1, "gemv"), C(bg, 32, 256, 2, 2, 1, "gemv")]
        cfgs += [C(16, 32, 256, 2, 4, 3), C(16, 128, 256, 8, 4, 3)]
        return cfgs
    if m <= 4:
        raise AssertionError("unreachable")
    if m <= 16:
        cfgs = []
        for mode in ("dot", "dot_swap"):
            for bn, bk in ((32, 256), (64, 128), (64, 256), (128, 128), (128, 256)):
                for split in (1, 2, 4, 8):
                    cfgs.append(C(16, bn, bk, split, 4, 3, mode))
            for warps, stages in ((8, 3), (4, 4), (4, 2)):
                for split in (1, 4):
                    cfgs.append(C(16, 64, 256, split, warps, stages, mode))
        return cfgs
    return [C(bm, bn, bk, 1, warps, stages, "dot") for bm, bn, bk, warps, stages in (
        (64, 64, 128, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 128, 4, 3))] + [
        C(bm, bn, bk, 1, warps, stages, "dot_swap") for bm, bn, bk, warps, stages in (
            (64, 128, 64, 4, 3), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (128, 64, 128, 4, 3),
            (256, 128, 64, 8, 3), (256, 64, 128, 8, 3))]


def run_sweep(m_values, deadline, save, focus="", shapes=None) -> list[dict]:
    """Time sweep_configs(m) for every shape; ``save(results)`` after each (shape, M)."""
    results = []
    for k, n in sorted(shapes or SHAPES, key=lambda s: s != (4096, 14336)):
        torch.manual_seed(0)
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        w = nv.pack_nvfp4(weight)
        # Weight copies per order timed: row order, both orders ("tiled"), or tile order only.
        weight_copies, row_copies = rotating_copies(weight, w)
        layouts = {} if focus in TILE_ONLY_FOCUSES else {False: row_copies}
        if focus == "tiled" or focus in TILE_ONLY_FOCUSES:
            layouts[True] = nv.weight_copies(nv.to_tiled(w), len(row_copies))
        del row_copies
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = nv.nvfp4_linear_reference(x.float(), w)
            with torch.no_grad():
                t_bf16 = rotating_us([lambda wt=wt: F.linear(x, wt) for wt in weight_copies]) / 1e3
            best = None
            for cfg, tiled in [(c, t) for c in sweep_configs(m, focus) for t in layouts]:
                if time.time() > deadline:
                    print("sweep: out of time", flush=True)
                    return results
                rec = {"M": m, "K": k, "N": n, "bf16_us": t_bf16 * 1e3, **cfg.__dict__, "tiled": tiled}
                w_copies = layouts[tiled]
                try:
                    y, written = checked_run(x, w_copies[0], cfg)
                    rec["rel_err"] = rel_err(y, ref)
                    rec["all_written"] = written
                    outs = [torch.empty_like(y) for _ in w_copies]
                    rec["us"] = rotating_us([lambda wq=wq, o=o: nv._launch(x, wq, None, o, cfg)
                                             for wq, o in zip(w_copies, outs)], reps=10)
                    rec["speedup"] = rec["bf16_us"] / rec["us"]
                    if written and rec["rel_err"] < 1e-2 and (best is None or rec["us"] < best["us"]):
                        best = rec
                except Exception as e:  # noqa: BLE001 - a config that fails to compile is recorded
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                results.append(rec)
            save(results)
            if best is not None:
                print(f"best M={m:4d} K={k:5d} N={n:5d}: {best['us']:7.1f} us ({best['speedup']:.2f}x vs bf16 "
                      f"{best['bf16_us']:.1f}) {best['mode']} bm{best['block_m']} bn{best['block_n']} "
                      f"bk{best['block_k']} s{best['split_k']} w{best['num_warps']} st{best['num_stages']}", flush=True)
        del weight, w, weight_copies, layouts
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------------------
# Decode on a Llama-shaped model
# --------------------------------------------------------------------------------------------------

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=32000, max_position_embeddings=2048,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval(), cfg


def decode_step_ms(model, cfg, prompt, token, replays, notes, label) -> dict:
    """Prefill 128 tokens into a static cache of 129, then time the step that decodes token 129."""
    from transformers import StaticCache

    length = prompt.shape[1]
    cache = StaticCache(config=cfg, max_cache_len=length + 1)
    pos = torch.tensor([length], device="cuda")
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(length, device="cuda"))

        def step():
            # A static cache layer writes at its own device-side counter (transformers 5.17 to 5.23
            # ignore cache_position there) and advances it; rewinding it makes every step, graph
            # replays included, decode token `length` again instead of running off the cache's end.
            for layer in cache.layers:
                layer.cumulative_length.fill_(length)
            return model(input_ids=token, past_key_values=cache, cache_position=pos).logits

        # Eager steps first: they also tune the kernel for every new shape before capture.
        for _ in range(3):
            logits = step()
        full = model(input_ids=torch.cat([prompt, token], dim=1)).logits[:, -1:]
        step_vs_full_sqnr = sqnr_db(full.float(), logits.float())
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        eager = []
        for _ in range(20):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            eager.append(start.elapsed_time(end))
        result = {"eager_ms": statistics.median(eager), "step_vs_full_forward_sqnr_db": step_vs_full_sqnr}
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = step()
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                start.record()
                for _ in range(replays):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / replays)
            result["graph_ms"] = statistics.median(times)
            result["logits"] = logits.float().clone()
        except Exception as e:  # noqa: BLE001
            notes.append(f"{label}: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "eager timing only")
            result["logits"] = step().float().clone()
    return result


def decode_benchmark(quick, notes) -> dict:
    model, cfg = build_model()
    torch.manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, 128), device="cuda")
    token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
    replays = 20 if quick else 100

    # Inputs of every decoder linear during the prefill, for the per-site SQNR.
    captured = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in DECODER_LINEARS:
            def hook(module, inputs, output, name=name):
                captured[name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=prompt)
    for h in hooks:
        h.remove()

    out = {"model": "Llama-shaped: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 32000, "
                     "random bf16 weights, sdpa; batch 1, decode at position 128 (static cache of 129)"}
    bf16 = decode_step_ms(model, cfg, prompt, token, replays, notes, "bf16")

    # The conversion the library's forced path does (rewriter.passes.nvfp4.convert_linears).
    originals = {name: model.get_submodule(name) for name in captured}
    done = convert_linears(model, lambda module, path: path in captured)
    sqnrs = {}
    with torch.no_grad():
        for c in done:
            lin, x = originals[c.path], captured[c.path]
            ref = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
            sqnrs[c.path] = sqnr_db(ref, c.module(x))
    bytes_bf16 = sum(c.dense_bytes for c in done)
    bytes_nvfp4 = sum(c.packed_bytes for c in done)
    del originals
    torch.cuda.empty_cache()
    nvfp4 = decode_step_ms(model, cfg, prompt, token, replays, notes, "nvfp4")

    (lm_head,) = convert_linears(model, lambda module, path: path == "lm_head")
    lm_bytes_bf16, lm_bytes_nvfp4 = lm_head.dense_bytes, lm_head.packed_bytes
    torch.cuda.empty_cache()
    nvfp4_lm = decode_step_ms(model, cfg, prompt, token, replays, notes, "nvfp4+lm_head")

    def summary(r):
        d = {k: v for k, v in r.items() if k != "logits"}
        best = d.get("graph_ms", d["eager_ms"])
        d["tokens_per_s"] = 1000.0 / best
        d["timing"] = "CUDA graph replay" if "graph_ms" in d else "eager"
        return d

    values = sorted(sqnrs.values())
    out.update({
        "bf16": summary(bf16),
        "nvfp4_decoder_linears": summary(nvfp4),
        "nvfp4_decoder_linears_and_lm_head": summary(nvfp4_lm),
        "converted_sites": len(sqnrs),
        "sqnr_db_min": values[0],
        "sqnr_db_median": statistics.median(values),
        "sqnr_db_min_site": min(sqnrs, key=sqnrs.get),
        "sqnr_db_per_site": sqnrs,
        "decoder_weight_bytes_bf16": bytes_bf16,
        "decoder_weight_bytes_nvfp4": bytes_nvfp4,
        "lm_head_bytes_bf16": lm_bytes_bf16,
        "lm_head_bytes_nvfp4": lm_bytes_nvfp4,
        "next_token_logits_sqnr_db_nvfp4": sqnr_db(bf16["logits"], nvfp4["logits"]),
        "next_token_top1_agrees_nvfp4": bool(bf16["logits"].argmax() == nvfp4["logits"].argmax()),
    })
    return out


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def fmt(v, spec, suffix=""):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec) + suffix


def decode_lines(decode) -> list[str]:
    """The decode section of the results file."""
    b, q, ql = decode["bf16"], decode["nvfp4_decoder_linears"], decode["nvfp4_decoder_linears_and_lm_head"]
    lines = [
        "## Decode, batch 1",
        "",
        decode["model"] + ".",
        "",
        "| weights | timing | ms/token | tokens/s | eager ms/token | step vs full forward, logits SQNR dB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, r in (("bf16", b), ("NVFP4 decoder linears, bf16 lm_head", q), ("NVFP4 decoder linears + lm_head", ql)):
        lines.append(f"| {label} | {r['timing']} | {1000 / r['tokens_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['eager_ms']:.3f} | {r['step_vs_full_forward_sqnr_db']:.1f} |")
    lines += [
        "",
        f"Per-site SQNR of the {decode['converted_sites']} converted linears on their prefill activations: "
        f"min {decode['sqnr_db_min']:.2f} dB ({decode['sqnr_db_min_site']}), median {decode['sqnr_db_median']:.2f} dB. "
        f"Next-token logits SQNR vs bf16: {decode['next_token_logits_sqnr_db_nvfp4']:.1f} dB "
        f"(top-1 {'agrees' if decode['next_token_top1_agrees_nvfp4'] else 'differs'}).",
        "",
        f"Decoder linear weights: {decode['decoder_weight_bytes_bf16'] / 1e6:.1f} MB bf16 -> "
        f"{decode['decoder_weight_bytes_nvfp4'] / 1e6:.1f} MB NVFP4 "
        f"(saves {(decode['decoder_weight_bytes_bf16'] - decode['decoder_weight_bytes_nvfp4']) / 1e6:.1f} MB); "
        f"lm_head {decode['lm_head_bytes_bf16'] / 1e6:.1f} MB -> {decode['lm_head_bytes_nvfp4'] / 1e6:.1f} MB.",
    ]
    return lines


def markdown(info, bw, rows, decode, notes) -> str:
    lines = [
        f"# NVFP4 weight-only linear on {info['device']}",
        "",
        f"torch {info['torch']}, triton {info['triton']}, {info['sm_count']} SMs, {info['date']}. "
        f"Measured device-to-device copy: {bw:.0f} GB/s (read + write).",
        "",
        "bf16 activations, no bias. Main columns ('back-to-back'): GPU time per call when calls run "
        "one after another from a CUDA graph, each on its own copy of the weight (copies together >= 3x "
        "L2), timed with CUDA events (median of 20 replays): every call reads its weight from memory, as "
        "the layers of a decode step do. 'Flushed' columns: median of `triton.testing.do_bench` over "
        "graph replays of a single call with L2 emptied before each one (do_bench writes 256 MB of "
        "zeros, so each call also pays for writing back dirty lines; it adds about the same absolute "
        "time to both). Eager: the plain call, launch cost included. GB/s: weight bytes over the "
        "back-to-back time (bf16: 2 B/element; NVFP4: 0.5625 B/element incl. scales; int4: its packed "
        "data, scales and zero points). int4 (torchao) is timed flushed only.",
        "",
        "| M | K | N | bf16 us | NVFP4 us | NVFP4 vs bf16 | bf16 GB/s | NVFP4 GB/s | flushed bf16 us | "
        "flushed NVFP4 us | flushed int4 us | flushed NVFP4 vs bf16 | eager bf16 us | eager NVFP4 us | "
        "NVFP4 kernel | NVFP4 rel err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        kern = kernel_label(r.get("config"))
        bf16_gbs = 2 * r["K"] * r["N"] / r["bf16_rot_us"] / 1e3
        nv_gbs = 0.5625 * r["K"] * r["N"] / r["nvfp4_rot_us"] / 1e3
        lines.append(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['bf16_rot_us']:.1f} | {r['nvfp4_rot_us']:.1f} | "
            f"{r['speedup_vs_bf16']:.2f}x | {bf16_gbs:.0f} | {nv_gbs:.0f} | {r['bf16_us']:.1f} | {r['nvfp4_us']:.1f} | "
            f"{fmt(r.get('int4_us'), '.1f')} | {r['flushed_speedup_vs_bf16']:.2f}x | "
            f"{r['bf16_eager_us']:.1f} | {r['nvfp4_eager_us']:.1f} | {kern} | {r['nvfp4_rel_err_vs_reference']:.1e} |"
        )
    if decode:
        lines += [""] + decode_lines(decode)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer M values and decode replays")
    parser.add_argument("--sweep", action="store_true", help="time a list of kernel configurations per shape")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode measurement")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the decode measurement, written to nvfp4_decode_<device>.md/.json")
    parser.add_argument("--sweep-m", default="1,16,256,64", help="M values of the sweep")
    parser.add_argument("--budget-s", type=float, default=240.0, help="time limit for the sweep")
    parser.add_argument("--sweep-focus", default="", help="'xlate': only the MMA kernel with x read late or with the words; "
                        "'kwarps': the MMA kernel with warps splitting K inside the program; "
                        "'tiled': the MMA kernel on the tile-ordered weight against the row layout; "
                        "'xlate2': x read per chunk against per tile (tile order); "
                        "'maxnreg': register caps on the best tile-order configurations; "
                        "'balance': K split in the program and over the grid together (tile order)")
    parser.add_argument("--sweep-shapes", default="", help="K:N pairs for the sweep, e.g. 4096:14336")
    parser.add_argument("--suffix", default="", help="added to the output file names (sweep and table)")
    parser.add_argument("--ms", default="", help="M values of the kernel table instead of 1,4,16,64,256")
    parser.add_argument("--shapes", default="", help="K:N pairs of the kernel table instead of the three default ones")
    parser.add_argument("--variants", action="store_true",
                        help="only fp16 activations and bias against bf16 (nvfp4_variants_<device>.md)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/nvfp4.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    info = device_info()
    print(json.dumps(info), flush=True)
    m_values = QUICK_M_VALUES if args.quick else M_VALUES
    if args.ms:
        m_values = [int(v) for v in args.ms.split(",")]
    name = slug(info["device"])

    if args.sweep:
        def save(results):
            with open(os.path.join(args.out, f"nvfp4_sweep{args.suffix}_{name}.json"), "w") as f:
                json.dump({"info": info, "results": results}, f, indent=1)

        shapes = [tuple(int(v) for v in p.split(":")) for p in args.sweep_shapes.split(",")] if args.sweep_shapes else None
        run_sweep([int(v) for v in args.sweep_m.split(",")], time.time() + args.budget_s, save, args.sweep_focus, shapes)
        return

    if args.variants:
        picked = {}
        if args.ms:
            picked["m_values"] = m_values
        if args.shapes:
            picked["shapes"] = [tuple(int(v) for v in p.split(":")) for p in args.shapes.split(",")]
        rows = variants_table(**picked)
        with open(os.path.join(args.out, f"nvfp4_variants{args.suffix}_{name}.md"), "w") as f:
            f.write(variants_markdown(info, rows))
        with open(os.path.join(args.out, f"nvfp4_variants{args.suffix}_{name}.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
        return

    notes: list[str] = []
    if args.decode_only:
        decode = decode_benchmark(args.quick, notes)
        md = "\n".join([f"# NVFP4 decode on {info['device']}", "",
                        f"torch {info['torch']}, triton {info['triton']}, {info['sm_count']} SMs, {info['date']}.", ""]
                       + decode_lines(decode) + (["", "## Notes", ""] + [f"- {n}" for n in notes] if notes else [])) + "\n"
        with open(os.path.join(args.out, f"nvfp4_decode_{name}.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, f"nvfp4_decode_{name}.json"), "w") as f:
            json.dump({"info": info, "decode": decode, "notes": notes}, f, indent=1, default=str)
        print(md)
        return

    bw = copy_bandwidth_gbs()
    table_shapes = [tuple(int(v) for v in p.split(":")) for p in args.shapes.split(",")] if args.shapes else None
    rows = kernel_table(m_values, notes, table_shapes)
    decode = None
    if not args.no_decode:
        try:
            decode = decode_benchmark(args.quick, notes)
        except Exception as e:  # noqa: BLE001 - the kernel table is still worth writing
            notes.append(f"decode benchmark failed: {type(e).__name__}: {e}")
            traceback.print_exc()
    notes = list(dict.fromkeys(notes))  # the same torchao failure is met once per shape
    md = markdown(info, bw, rows, decode, notes)
    with open(os.path.join(args.out, f"nvfp4{args.suffix}_{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, f"nvfp4{args.suffix}_{name}.json"), "w") as f:
        json.dump({"info": info, "copy_bandwidth_GBs": bw, "kernel": rows, "decode": decode, "notes": notes,
                   "tuning": {str(k): [{"config": c.__dict__, "us": ms * 1e3} for c, ms in v]
                              for k, v in nv.TUNING_LOG.items()}}, f, indent=1, default=str)
    print(md)


if __name__ == "__main__":
    main()

"""Best configurations of an NVFP4 sweep (``benchmarks/nvfp4.py --sweep``), per (M, K, N) and per
value of the compared fields; used by ``benchmarks/gpu_run.sh``.

    python benchmarks/sweep_summary.py OUT_DIR SUFFIX [--by field,field] [--top N]

reads ``OUT_DIR/nvfp4_sweep{SUFFIX}_*.json``. Only configurations that wrote every output with a
relative error under 1e-2 are ranked; the others are counted (and the first three shown) at the end.
"""

import argparse
import glob
import json
import os


def summarize(path: str, by: list[str], top: int) -> None:
    res = json.load(open(path))["results"]
    ok = [r for r in res if "us" in r and r.get("all_written") and r["rel_err"] < 1e-2]
    for key in sorted({(r["M"], r["K"], r["N"]) for r in ok}):
        rows = sorted((r for r in ok if (r["M"], r["K"], r["N"]) == key), key=lambda r: r["us"])
        print(f"M={key[0]} K={key[1]} N={key[2]}: bf16 {rows[0]['bf16_us']:.1f} us")
        for group in sorted({tuple(r.get(f, 0) for f in by) for r in rows}):
            label = " ".join(f"{f}={v}" for f, v in zip(by, group))
            for r in [r for r in rows if tuple(r.get(f, 0) for f in by) == group][:top]:
                print(f"   {label} {r['us']:.1f} us {r['speedup']:.2f}x kw{r.get('kwarps', 1)} w{r['num_warps']} "
                      f"bn{r['block_n']} s{r['split_k']} a{r['ahead']} xl{r.get('x_late', 0)} {r.get('reduce', '')} "
                      f"{'p%d ' % r['persist'] if 'persist' in r else ''}r{r.get('maxnreg', 0)} err {r['rel_err']:.1e}")
    bad = [r for r in res if "error" in r or not r.get("all_written") or r.get("rel_err", 1) >= 1e-2]
    print("bad configs:", len(bad), [(r.get("error"), r.get("rel_err")) for r in bad[:3]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("suffix")
    ap.add_argument("--by", default="", help="fields whose values are compared, e.g. tiled or x_late,ahead")
    ap.add_argument("--top", type=int, default=5, help="configurations shown per value")
    args = ap.parse_args()
    by = [f for f in args.by.split(",") if f]
    for path in sorted(glob.glob(os.path.join(args.out, f"nvfp4_sweep{args.suffix}_*.json"))):
        summarize(path, by, args.top)


if __name__ == "__main__":
    main()

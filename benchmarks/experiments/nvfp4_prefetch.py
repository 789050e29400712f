"""L2 prefetch by the copy engine in the NVFP4 warp-MMA kernel (``NVFP4GemmConfig.prefetch``,
NOTES_nvfp4.md, ninth round): each of the library's MMA candidates with prefetch 0 (as today),
1 (all of a warp's tiles at its start) and P = 2, 4 (P tiles ahead), timed back to back (one CUDA
graph with one call per weight copy, as many copies as the tuner takes (``copies_for``: >= 3x L2,
at most 64), median of 10 replays) beside bf16
F.linear and the tuned ``NVFP4Linear`` in the same process. Every prefetch variant's output must
equal its configuration's output without prefetch bit for bit (a prefetch changes no
arithmetic). fp16 at M = 16 also runs each candidate with ``maxnreg=128`` (the eighth round's
register lead).

The second run (``x``) asks whether x, which the 16-column kernel reads late (just before its
MMAs, from L1 or L2), holds M = 16 back: each candidate with x of the tile one or two ahead
prefetched into L1 (``x_prefetch``), x loads that ask L1 to keep their lines (``x_keep``), bf16
register caps of 128, 120 and 112, x read with the words (``x_late`` 0) or per chunk (2), the
M = 16 kernels run with one x row (every lane's x the same line: x's traffic gone, the MMAs and
registers unchanged), and the L2 prefetch at small shapes. The third (``atomic``) times the
in-kernel split-K sum against the second kernel.

None of these was faster (NOTES_nvfp4.md, ninth round), and the kernel options they need
(``prefetch``, ``x_prefetch``, ``x_keep``) were removed from the library afterwards: run this at
commit 5345d49, where they are. The fp16 register cap it found is now in the candidates.

    PYTHONPATH=. python benchmarks/experiments/nvfp4_prefetch.py [OUT.json]     # first run
    PYTHONPATH=. python benchmarks/experiments/nvfp4_prefetch.py [OUT.json] x   # second run
    PYTHONPATH=. python benchmarks/experiments/nvfp4_prefetch.py [OUT.json] atomic  # split sums (main)
"""
import copy
import dataclasses
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvfp4_wgmma_probe import _device_line, _graph_us  # noqa: E402

from rewriter.kernels import nvfp4 as nv  # noqa: E402

PREFETCHES = (0, 1, 2, 4)


def _name(c):
    return (f"n{c.block_n} w{c.num_warps} kw{c.kwarps} s{c.split_k} a{c.ahead} xl{c.x_late}"
            + (f" r{c.maxnreg}" if c.maxnreg else ""))


def _label(v):
    return " ".join(f"{k}={x}" for k, x in v.items()) or "as is"


def run(entries, out_path=None, rounds=2, valid=None):
    """``entries``: (K, N, Ms, dtype, variants, bucket): each MMA candidate of the M bucket
    (``bucket``, or M's own) with each variant (a dict of NVFP4GemmConfig fields to change), timed
    at each M. The best time per variant is printed beside bf16 and the tuned library. ``valid``:
    a predicate on a variant's configuration; those it rejects are left out."""
    _device_line()
    rows = []
    for k, n, ms, dt, variants, bucket in entries:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        w = nv.to_tiled(nv.pack_nvfp4(lin.weight.float()))
        c4 = nv.copies_for(w.nbytes())
        cbf = nv.copies_for(n * k * 2)
        wc = nv.weight_copies(w, c4)
        ref_w = nv.unpack_nvfp4(w).double()
        bc = [lin.weight.detach().to(dt).clone() for _ in range(cbf)]
        lib = [nv.NVFP4Linear.from_linear(copy.deepcopy(lin).to(dt)) for _ in range(c4)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            ref = x.double() @ ref_w.T
            base = [c for c in nv._candidates(bucket or m, k, mma=True) if c.mode == "mma"]
            cfgs = [(_label(v), c, dataclasses.replace(c, **v)) for c in base for v in variants]
            cfgs = [t for t in cfgs if valid is None or valid(t[2])]
            out = torch.empty(m, n, device="cuda", dtype=dt)
            outs, errs = {}, {}
            for c in dict.fromkeys([b for _, b, _ in cfgs] + [c for _, _, c in cfgs]):
                nv._launch(x, w, None, out, c)
                outs[c] = out.clone()
                errs[c] = ((out.double() - ref).norm() / ref.norm()).item()
            bad = [(lab, c) for lab, b, c in cfgs if not torch.equal(outs[c], outs[b])]
            times = {c: [] for _, _, c in cfgs}
            t_bf, t_lib = [], []
            with torch.no_grad():
                for _ in range(rounds):
                    t_bf.append(_graph_us(lambda i: F.linear(x, bc[i]), cbf))
                    t_lib.append(_graph_us(lambda i: lib[i](x), c4))
                    for _, _, c in cfgs:
                        o = torch.empty(m, n, device="cuda", dtype=dt)
                        times[c].append(_graph_us(lambda i: nv._launch(x, wc[i], None, o, c), c4))
            bf, lb = statistics.median(t_bf), min(t_lib)
            best = {}
            for lab, _, c in cfgs:
                t = min(times[c])
                if lab not in best or t < best[lab][0]:
                    best[lab] = (t, c)
            line = (f"{torch.cuda.get_device_name()} {str(dt)[6:]} K={k} N={n} M={m}"
                    + (f" (bucket {bucket})" if bucket else "")
                    + f": bf16 {bf:.1f} us, library {lb:.1f} ({bf / lb:.2f}x)")
            for lab, (t, c) in best.items():
                line += f" | {lab}: {t:.1f} ({bf / t:.2f}x) [{_name(c)}]"
            print(line, f"| max rel err {max(errs.values()):.2e}, not bit-equal: {len(bad)}", flush=True)
            rows.append(dict(k=k, n=n, m=m, bucket=bucket, dtype=str(dt), bf16_us=t_bf, library_us=t_lib,
                             bad=[lab + " " + _name(c) for lab, c in bad], max_err=max(errs.values()),
                             configs=[dict(variant=lab, name=_name(c), us=times[c], err=errs[c])
                                      for lab, _, c in cfgs]))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    path = next((a for a in sys.argv[1:] if a.endswith(".json")), None)
    bf, f16 = torch.bfloat16, torch.float16
    if "atomic" in sys.argv[1:]:
        # The split-K candidates with the in-kernel sum (the last program of a row block sums the
        # splits, every load in flight at once) against the second kernel.
        run([(k, n, ms, bf, [{}, {"reduce": "atomic"}], None)
             for k, n, ms in ((4096, 14336, (1, 8, 16)), (14336, 4096, (1, 16)), (4096, 4096, (1, 16)),
                              (2048, 8192, (1,)), (8192, 2048, (1,)))], path)
        sys.exit(0)
    if "rest" in sys.argv[1:]:
        sys.argv.append("x")
    if "x" in sys.argv[1:]:
        # Second run: x into L1 ahead of use (prefetch.global.L1) or kept there (evict_last), register
        # caps for bf16, the L2 prefetch at small shapes, and the 16-column kernel with x broadcast.
        xv = [{}, {"x_prefetch": 1}, {"x_prefetch": 2}, {"x_keep": 1}, {"x_prefetch": 1, "x_keep": 1}]
        entries = [(4096, 14336, (16,), bf, xv + [{"maxnreg": 128}, {"maxnreg": 120}, {"maxnreg": 112},
                                                  {"x_late": 0}, {"x_late": 2}], None),
                   (4096, 14336, (1,), bf, [{}], 16),  # M = 16's kernels with one x row for all
                   (4096, 14336, (16,), f16, [{"maxnreg": 128}, {"maxnreg": 128, "x_prefetch": 1},
                                              {"maxnreg": 128, "x_keep": 1}], None),
                   (4096, 14336, (8,), bf, xv[:2] + xv[3:4], None),
                   (14336, 4096, (16,), bf, xv[:4], None),
                   (4096, 4096, (16,), bf, xv[:4], None)]
        entries += [(k, n, (1,), bf, [{"prefetch": p} for p in (0, 2, 4, 8)], None)
                    for k, n in ((2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096))]
    else:
        pf = [{"prefetch": p} for p in PREFETCHES]
        entries = [(4096, 14336, (1, 4, 8, 16), bf, pf, None),
                   (4096, 14336, (16,), f16, pf + [{"maxnreg": 128}, {"maxnreg": 128, "prefetch": 1}], None),
                   (14336, 4096, (1, 16), bf, pf, None), (4096, 4096, (1, 16), bf, pf, None)]
    if "rest" in sys.argv[1:]:  # the entries after the first two (the first x run stopped there)
        entries = entries[2:]
    run(entries, path)

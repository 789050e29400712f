"""Which configuration should the NVFP4 MMA kernel use at M = 9..16 when the tuner cannot time one
(during CUDA graph capture without an earlier call, and for weights under 2**20 elements)? The
bucket's first candidate (one row group, four warps splitting K, x read as it comes) against the
same with x in fragment order, overlapped (x_frag 2), and the tuner's pick, at the sizes of small
and large models' linears; back to back in a CUDA graph, one call per weight copy, median of 10
replays, best of two rounds; bf16 F.linear in the same process.

    PYTHONPATH=. python benchmarks/experiments/nvfp4_default16.py [OUT.json]
"""
import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvfp4_wgmma_probe import _device_line, _graph_us  # noqa: E402

from rewriter.kernels import nvfp4 as nv  # noqa: E402

SHAPES = [(512, 512), (1024, 1024), (1024, 4096), (4096, 1024), (2048, 2048), (2048, 8192), (8192, 2048),
          (4096, 4096), (4096, 14336), (14336, 4096)]

if __name__ == "__main__":
    path = next((a for a in sys.argv[1:] if a.endswith(".json")), None)
    _device_line()
    rows = []
    for k, n in SHAPES:
        torch.manual_seed(0)
        wf = torch.randn(n, k, device="cuda")
        w = nv.to_tiled(nv.pack_nvfp4(wf))
        c4, cbf = nv.copies_for(w.nbytes()), nv.copies_for(n * k * 2)
        wc = nv.weight_copies(w, c4)
        bc = [wf.to(torch.bfloat16) for _ in range(cbf)]
        for m in (9, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            first = nv._candidates(16, k, mma=True)[0]
            frag = dataclasses.replace(first, x_frag=2)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            nv._launch(x, w, None, out, first)
            a = out.clone()
            nv._launch(x, w, None, out, frag)
            same = torch.equal(a, out)
            nv._TUNED.clear()
            tuned = nv._select_config(x, w, None, out)
            t = {"bf16": [], "first": [], "first_xf2": [], "tuned": []}
            for _ in range(2):
                t["bf16"].append(_graph_us(lambda i: F.linear(x, bc[i]), cbf))
                for lab, c in (("first", first), ("first_xf2", frag), ("tuned", tuned)):
                    o = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                    t[lab].append(_graph_us(lambda i: nv._launch(x, wc[i], None, o, c), c4))
            b = {lab: min(v) for lab, v in t.items()}
            print(f"K={k} N={n} M={m}: bf16 {b['bf16']:.1f} us | first {b['first']:.1f} | first xf2 "
                  f"{b['first_xf2']:.1f} | tuned {b['tuned']:.1f} ({tuned}) | bit-equal {same}", flush=True)
            rows.append(dict(k=k, n=n, m=m, us=t, tuned=str(tuned), bit_equal=same))
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)

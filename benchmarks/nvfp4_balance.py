"""Is the NVFP4 MMA kernel limited by how its programs spread over the SMs? Times one configuration
(back to back, rotating weight copies, as benchmarks/nvfp4.py) at N values whose program count
fills every SM equally and at the usual N = 14336, and prints the time per MB of weight.

    python benchmarks/nvfp4_balance.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rewriter.kernels.nvfp4 as nv  # noqa: E402

C = nv.NVFP4GemmConfig


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    k = 4096
    cases = [  # (M, config, rows per program, programs per SM at once)
        (16, C(16, 32, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4), 32, 4),
        (1, C(8, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4), 16, 8),
    ]
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, K = {k}")
    for m, cfg, rows, per_sm in cases:
        ns = sorted({14336, sms * (per_sm - 1) * rows, sms * per_sm * rows, 2 * sms * per_sm * rows})
        for n in ns:
            torch.manual_seed(0)
            w = nv.to_tiled(nv.pack_nvfp4(torch.randn(n, k, device="cuda") * 0.02))
            copies = nv.weight_copies(w, nv.copies_for(w.nbytes()))
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            nv._launch(x, w, None, out, cfg)
            ref = nv.nvfp4_linear_reference(x.float(), w)
            err = float((out.float() - ref).norm() / ref.norm())
            us = [nv.back_to_back_ms([lambda wc=wc: nv._launch(x, wc, None, out, cfg) for wc in copies]) * 1e3
                  for _ in range(3)]
            us = sorted(us)[1]
            progs = -(-n // cfg.block_n)
            print(f"M={m:2d} N={n:6d} programs {progs:5d} ({progs / sms:5.2f} per SM, {per_sm} fit): {us:6.2f} us, "
                  f"{us / (w.nbytes() / 1e6):.4f} us/MB, rel err {err:.1e}", flush=True)
            del w, copies
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

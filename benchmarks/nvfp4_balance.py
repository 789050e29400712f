"""Is the NVFP4 MMA kernel limited by how its programs spread over the SMs? Times one configuration
(back to back, rotating weight copies, as benchmarks/nvfp4.py) at N values whose program count
fills every SM equally and at the usual N = 14336, and prints the time per MB of weight.

    python benchmarks/nvfp4_balance.py [--persist]

``--persist``: the same configurations on one wave of programs with the work split evenly
(``persist`` programs per SM, rewriter.kernels.nvfp4.sk_plan) at N values where that wave is all
whole row blocks, whole row blocks and stream-K programs, or stream-K programs only, each against
the plain grid, with the compiled kernels' registers and how many programs fit per SM.
"""

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rewriter.kernels.nvfp4 as nv  # noqa: E402

C = nv.NVFP4GemmConfig


def time_us(x, copies, out, cfg) -> float:
    us = [nv.back_to_back_ms([lambda wc=wc: nv._launch(x, wc, None, out, cfg) for wc in copies]) * 1e3
          for _ in range(3)]
    return sorted(us)[1]


def compiled_report() -> None:
    """Registers, spills and programs per SM of every compiled variant of the two MMA kernels."""
    for name in ("_nvfp4_mma_kernel", "_nvfp4_mma_sk_kernel"):
        fn = getattr(nv, name)
        try:
            kernels = [k for cache in fn.device_caches.values() for k in cache[0].values()]
        except Exception as e:  # noqa: BLE001 - the cache layout is Triton's, not ours
            print(f"  {name}: compiled kernels not found ({type(e).__name__}: {e})")
            continue
        for k in kernels:
            if True:
                warps = k.metadata.num_warps
                per_warp = -(-k.n_regs * 32 // 256) * 256
                fit = min(65536 // (per_warp * warps), 64 // warps, 32)
                print(f"  {name}: {warps} warps, {k.n_regs} registers, {k.n_spills} spills, "
                      f"smem {k.metadata.shared}, {fit} programs per SM fit")


def persist_main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    k = 4096
    cases = [  # (M, config, rows per program, programs per SM)
        (16, C(16, 32, 128, 1, 4, 1, "mma", 2, 1, x_late=1, kwarps=4, maxnreg=128), 32, 4),
        (1, C(8, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4, maxnreg=64), 16, 8),
    ]
    # Experiments on the persistent kernel: without the sums of shared row blocks (wrong outputs,
    # time only), and with the stream-K work on the first program ids.
    experiments = {"persist": {}, "no-sums": {"PUBLISH": 0}, "sk-first": {"SK_FIRST": 1},
                   "all-sk": {}, "all-sk-no-sums": {"PUBLISH": 0}}
    plan_of = nv.sk_plan
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, K = {k}")
    for m, cfg, rows, per_sm in cases:
        pcfg = dataclasses.replace(cfg, persist=per_sm)
        upb = k // 128 // cfg.kwarps
        # all whole row blocks (per_sm - 1 per SM), the target shape, stream-K only
        for n in (14336,):
            torch.manual_seed(0)
            w = nv.to_tiled(nv.pack_nvfp4(torch.randn(n, k, device="cuda") * 0.02))
            copies = nv.weight_copies(w, nv.copies_for(w.nbytes()))
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = nv.nvfp4_linear_reference(x.float(), w)
            blocks = -(-n // cfg.block_n)
            plan = nv.sk_plan(blocks, upb, sms, per_sm)
            line = f"M={m:2d} N={n:6d} r{cfg.maxnreg} blocks {blocks} plan (whole, stream-K) {plan}:"
            for label, c, extra in [("plain", cfg, {})] + [(e, pcfg, v) for e, v in experiments.items()]:
                nv._SK_EXPERIMENT.clear()
                nv._SK_EXPERIMENT.update(extra)
                # "all-sk": every program stream-K (equal ranges, no whole row blocks)
                nv.sk_plan = ((lambda blocks, upb, sms_, per: (0, min(blocks * upb, sms_ * per)))
                              if label.startswith("all-sk") else plan_of)
                out.fill_(float("nan"))
                nv._launch(x, w, None, out, c)
                err = float((out.float() - ref).norm() / ref.norm())
                line += f" {label} {time_us(x, copies, out, c):6.2f} us (err {err:.0e})"
                nv._SK_EXPERIMENT.clear()
                nv.sk_plan = plan_of
            print(line, flush=True)
            del w, copies
            torch.cuda.empty_cache()
    compiled_report()


def main() -> None:
    if "--persist" in sys.argv:
        persist_main()
        return
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

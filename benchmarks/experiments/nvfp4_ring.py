"""The NVFP4 warp-MMA kernel with its K tiles in flight in shared memory (``NVFP4GemmConfig.ring``,
NOTES_nvfp4.md, eleventh round). Without it a warp holds the words and scales of its next tile
(one or two) in registers while it decodes the current one, and deeper register rings cost warps
per SM (fourth round, item 3). With ``ring`` R each warp copies its next R - 1 tiles into its own
slots of a static shared array with ``cp.async`` (no registers held) and reads each tile back
when it decodes it.

Each MMA candidate of the M bucket as is and with ring 3 / 4 / 6 (where the ring fits the 48 KB
of static shared memory per program) is timed back to back (one CUDA graph with one call per
weight copy, median of 10 replays, best of two rounds) beside bf16 F.linear and the tuned
``NVFP4Linear`` in the same process (``nvfp4_prefetch.run``); every variant's output must equal
its configuration's without the ring bit for bit.

It was slower at every shape and M (NOTES_nvfp4.md, eleventh round), and the option was removed
from the library afterwards: run this at commit e83d0f8, where it is.

    PYTHONPATH=. python benchmarks/experiments/nvfp4_ring.py [OUT.json]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvfp4_prefetch import run  # noqa: E402

from rewriter.kernels import nvfp4 as nv  # noqa: E402


def fits(c):
    return not c.ring or c.num_warps * c.ring * 1152 * nv._mma_groups_of(c) <= 48 * 1024


if __name__ == "__main__":
    path = next((a for a in sys.argv[1:] if a.endswith(".json")), None)
    bf = torch.bfloat16
    rings = [{}, {"ring": 3}, {"ring": 4}, {"ring": 6}]
    entries = [(4096, 14336, (1, 8, 16), bf, rings, None),
               (14336, 4096, (1, 16), bf, rings, None),
               (4096, 4096, (1, 16), bf, rings, None)]
    run(entries, path, valid=fits)

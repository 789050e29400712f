"""Triton kernels and their ``torch.library`` custom ops.

One op per file: the Triton kernel(s), the launcher, the custom op (fake implementation and
autograd registration) and a plain PyTorch reference used by the tests. Nothing here knows about
graphs; the passes in :mod:`rewriter.passes` decide where an op is used.
"""

import torch, math
from rewriter.kernels import flash_attention_sm90 as g
q = torch.randn(4, 16, 2048, 128, device="cuda", dtype=torch.bfloat16)
for pp in (False, True):
    o, l = g.attention_forward_sm90(q, q, q, 1/math.sqrt(128), False, True, 0, 0, pingpong=pp)
    torch.cuda.synchronize()
    print("pp", pp, "ok", float(o.float().abs().mean()))

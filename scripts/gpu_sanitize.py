"""A small kernel run for compute-sanitizer memcheck (fixed config, no autotuning)."""

import torch

from tailattn.kernels import block_sparse_attention
from tailattn.layout import BlockLayout

torch.manual_seed(0)
for d, bq, n in ((64, 64, 300), (128, 128, 333)):
    q, k, v = (torch.randn(2, 2, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    m = -(-n // bq)
    mask = torch.rand(2, 2, m, m, device="cuda") < 0.4
    mask[..., -1] = True
    layout = BlockLayout.from_dense(mask, n, n, bq, bq)
    for tail, tma in (("drop", False), ("uta", True), ("blocks", False), ("drop", True)):
        out, lse = block_sparse_attention(
            q,
            k,
            v,
            layout,
            tail,
            config={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "USE_TMA": tma},
        )
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
print("sanitizer run finished")

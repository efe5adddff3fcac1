"""The skipping kernel (BLASST, fixed recall) for compute-sanitizer memcheck:

    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/gpu_sanitize_skipping.py

Ragged N (333, 1,000, 200), head dims 64 and 128, bfloat16 and float16, both rules, every kernel
tail, the launch configs the autotuner chooses from (all at N = 333, every third otherwise) and
block sizes 64 and 128; then three specs through ``tailattn.attention`` against the float64
reference. Exits 1 when an output is not finite or the relative error exceeds 3e-2.
"""

import sys

import torch

import tailattn
from tailattn.contract import KernelTail
from tailattn.kernels import skipping
from tailattn.kernels.skipping import BlasstRule, RecallRule, skipping_attention

if not torch.cuda.is_available():
    sys.exit("error: gpu_sanitize_skipping.py needs CUDA (it runs the skipping kernel)")
torch.manual_seed(0)
worst = 0.0
for n, d, dtype in [
    (333, 64, torch.bfloat16),
    (1000, 128, torch.float16),
    (200, 128, torch.bfloat16),
]:
    q, k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=dtype) * s for s in (2.0, 2.0, 1.0))
    for rule in (BlasstRule(lam=1e-3), RecallRule(recall=0.9), RecallRule(recall=0.99)):
        for tail in KernelTail:
            for config in skipping.launch_configs()[:: 1 if n == 333 else 3]:
                for block in (64, 128):
                    r = skipping_attention(
                        q, k, v, rule, tail=tail, block_q=block, block_k=block, config=config
                    )
                    torch.cuda.synchronize()
                    if not torch.isfinite(r.out).all():
                        sys.exit(f"not finite: n={n} d={d} {rule} {tail} {config} block {block}")
    for spec in ("blasst(lam=0.001)+uta", "recall(recall=0.95)+blocks", "recall(recall=0.9)"):
        out = tailattn.attention(q, k, v, spec, backend="triton")
        exact = (x.double().cpu() for x in (q, k, v))
        ref = tailattn.attention(*exact, spec, backend="reference")
        err = float((out.double().cpu() - ref).norm() / ref.norm())
        worst = max(worst, err)
        print(f"n={n} d={d} {dtype} {spec}: rel {err:.2e}", flush=True)
print("done, worst rel", worst)
sys.exit(0 if worst < 3e-2 else 1)

"""Time block-err's probe kernel for each number of probes per program (``block_p``), masses
only and with key sketches, and its greedy kernel, at the toy's, Wan2.1-1.3B 480p's and
Wan2.1-14B 720p's sizes (random bf16 q, k; 128 x 128 blocks; r = 32, or D when smaller):

    python scripts/sweep_probe_tiles.py

Each line also gives the largest difference of the outputs to the 64-probe tiling (they should
agree to rounding). ``triton.testing.do_bench`` (50 warm-up and 300 timed milliseconds), in
microseconds.
"""

import sys
from functools import partial

import torch

if not torch.cuda.is_available():
    sys.exit("error: sweep_probe_tiles.py needs CUDA (it times Triton kernels)")

from triton.testing import do_bench

from tailattn.kernels.error_scoring import greedy_drop, probe_stats
from tailattn.select.blocks import pool_blocks
from tailattn.select.error_aware import sketch_matrix

SHAPES = {
    "toy": (1, 8, 16384, 32),
    "wan-1.3b-480p": (1, 12, 32760, 128),
    "wan-14b-720p": (1, 40, 75600, 128),
}


def sweep(name: str, b: int, h: int, n: int, d: int) -> None:
    """One shape: every tile of probes, then the greedy."""
    q, k = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in "qk")
    qhat = pool_blocks(q, 128).float().contiguous()
    sketch = sketch_matrix(d, min(32, d), torch.float32, k.device)
    probe = partial(probe_stats, qhat, k, d**-0.5, 128)
    ref_mass, ref_sketch = probe(sketch, block_p=64)
    for block_p in (16, 32, 64, 128, 256):
        masses = do_bench(partial(probe, None, block_p=block_p), warmup=50, rep=300)
        keys = do_bench(partial(probe, sketch, block_p=block_p), warmup=50, rep=300)
        mass, key_sketch = probe(sketch, block_p=block_p)
        diff = max(
            (mass - ref_mass).abs().max().item(), (key_sketch - ref_sketch).abs().max().item()
        )
        print(
            f"{name} block_p={block_p:4d}: masses {masses * 1e3:8.1f} us, with sketches "
            f"{keys * 1e3:8.1f} us (max diff to 64: {diff:.2e})",
            flush=True,
        )
    mk = ref_mass.shape[-1]
    steps = -(-mk // 10)
    greedy = do_bench(partial(greedy_drop, ref_mass, ref_sketch, steps, 0.25), warmup=20, rep=200)
    print(f"{name} greedy {steps} steps over {mk} blocks: {greedy * 1e3:.1f} us", flush=True)


torch.manual_seed(0)
for name, shape in SHAPES.items():
    sweep(name, *shape)

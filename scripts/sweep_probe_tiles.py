"""Time block-err's probe kernel for each number of probes per program (``block_p``), masses
only and with key sketches, and its greedy kernel, at the toy's, Wan2.1-1.3B 480p's and
Wan2.1-14B 720p's sizes (random bf16 q, k; 128 x 128 blocks; r = 32, or D when smaller):

    python scripts/sweep_probe_tiles.py [--greedy-only]

Each probe line also gives the largest difference of the outputs to the 64-probe tiling (they
should agree to rounding). The greedy runs the fixed budget's ceil(Mk / 10) steps (keep 0.1)
and the adaptive budget's twice as many, over every key block and over the selection's default
candidates (``greedy_candidates``, 256 or 4 per step; the time includes choosing them), with
the share of picks the two agree on. ``triton.testing.do_bench`` (50 warm-up and 300 timed
milliseconds; 20 and 200 for the greedy), in microseconds.
"""

import argparse
import sys
from functools import partial

import torch

if not torch.cuda.is_available():
    sys.exit("error: sweep_probe_tiles.py needs CUDA (it times Triton kernels)")

from triton.testing import do_bench

from tailattn.kernels.error_scoring import greedy_drop, probe_stats
from tailattn.select.blocks import pool_blocks
from tailattn.select.error_aware import BlockErr, greedy_candidates, sketch_matrix

SHAPES = {
    "toy": (1, 8, 16384, 32),
    "wan-1.3b-480p": (1, 12, 32760, 128),
    "wan-14b-720p": (1, 40, 75600, 128),
}


def with_candidates(log_mass, key_sketch, steps):
    """The greedy over the selection's default candidates, choosing them included."""
    ids = greedy_candidates(log_mass, steps, BlockErr(0.1).candidates)
    return greedy_drop(log_mass, key_sketch, steps, 0.25, ids), ids


def time_greedy(name: str, log_mass: torch.Tensor, key_sketch: torch.Tensor) -> None:
    mk = log_mass.shape[-1]
    for steps in (-(-mk // 10), min(mk, 2 * -(-mk // 10))):
        every = do_bench(partial(greedy_drop, log_mass, key_sketch, steps, 0.25), 20, 200)
        (picks, _), ids = with_candidates(log_mass, key_sketch, steps)
        if ids is None:
            print(f"{name} greedy {steps} steps over {mk} blocks: {every * 1e3:.1f} us "
                  "(every block a candidate)", flush=True)  # fmt: skip
            continue
        cand = do_bench(partial(with_candidates, log_mass, key_sketch, steps), 20, 200)
        full = greedy_drop(log_mass, key_sketch, steps, 0.25)[0]
        same = (picks.unsqueeze(-1) == full.unsqueeze(-2)).any(-1).float().mean().item()
        print(
            f"{name} greedy {steps} steps over {mk} blocks: {every * 1e3:.1f} us; over "
            f"{ids.shape[-1]} candidates {cand * 1e3:.1f} us ({same:.1%} of the picks shared)",
            flush=True,
        )


def sweep(name: str, b: int, h: int, n: int, d: int, tiles: bool) -> None:
    """One shape: every tile of probes, then the greedy."""
    q, k = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in "qk")
    qhat = pool_blocks(q, 128).float().contiguous()
    sketch = sketch_matrix(d, min(32, d), torch.float32, k.device)
    probe = partial(probe_stats, qhat, k, d**-0.5, 128)
    ref_mass, ref_sketch = probe(sketch, block_p=64)
    for block_p in (16, 32, 64, 128, 256) if tiles else ():
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
    time_greedy(name, ref_mass, ref_sketch)


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--greedy-only", action="store_true", help="skip the probe tiles")
args = parser.parse_args()
torch.manual_seed(0)
for name, shape in SHAPES.items():
    sweep(name, *shape, tiles=not args.greedy_only)

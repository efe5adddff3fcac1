"""Where a selection's time goes on the GPU: the CUDA kernels of a few selection calls, by total
time (``torch.profiler``), per call.

    python scripts/profile_selection.py --methods "block-err(for_tail=drop);block-err;block-topk"

Random bf16 q, k of the given shape (``--shape``: a preset of ``tailattn bench`` or B,H,N,D;
default Wan2.1-1.3B 480p: 1, 12, 32760, 128): the kernels
and their sizes do not depend on the values. The wall time of a call (``tailattn.bench.calls``)
above its CUDA time is host work (Python, launches), which CUDA-graph capture removes.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="block-err(for_tail=drop);block-err;block-topk")
    parser.add_argument("--shape", default="wan-1.3b-480p", help="a shape preset or B,H,N,D")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rows", type=int, default=12, help="kernels listed per method")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: profile_selection.py needs CUDA (it profiles GPU kernels)")
    from torch.profiler import ProfilerActivity, profile

    import tailattn
    from tailattn.bench.kernel import parse_shape

    try:
        shape = parse_shape(args.shape)
    except ValueError as err:
        sys.exit(f"error: {err}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "qk")
    scale = shape[-1] ** -0.5
    for spec in args.methods.split(";"):
        select = tailattn.registry.bind(spec, keep=args.keep).selection
        for _ in range(3):  # compiles, autotunes
            select(q, k, scale=scale)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                select(q, k, scale=scale)
            torch.cuda.synchronize()
        events = prof.key_averages()
        cuda = sum(e.self_device_time_total for e in events) / args.calls / 1e3
        print(f"\n{spec} (keep {args.keep:g}): {cuda:.3f} ms of CUDA kernels per call")
        rows = sorted(events, key=lambda e: -e.self_device_time_total)[: args.rows]
        for e in rows:
            print(f"  {e.self_device_time_total / args.calls / 1e3:8.3f} ms  {e.key[:90]}")


if __name__ == "__main__":
    main()

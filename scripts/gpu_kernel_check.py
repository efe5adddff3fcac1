"""GPU correctness of the fused kernel at Wan shapes: poisoned outputs, sampled rows vs float32.

Usage: python scripts/gpu_kernel_check.py [--shapes wan-1.3b-480p,wan-14b-720p]
"""

from __future__ import annotations

import argparse
import math

import torch

from tailattn.bench import parse_shape
from tailattn.kernels import block_sparse_attention, block_sums
from tailattn.layout import block_sizes
from tailattn.methods import registry
from tailattn.reference import merge_tokens


def reference_rows(q, k, v, layout, tail, rows):
    """float32 token-level evaluation for the given query rows (no permutation)."""
    s = 1 / math.sqrt(q.shape[-1])
    qr = q[:, :, rows].float()
    z = (qr @ k.float().transpose(-1, -2)) * s
    dense = layout.to_dense()[:, :, rows // layout.block_q]
    kept = dense[..., torch.arange(k.shape[2], device=q.device) // layout.block_k]
    zk = z.masked_fill(~kept, -math.inf)
    lse_k = torch.logsumexp(zk, -1)
    out = torch.softmax(zk, -1) @ v.float()
    if tail == "uta":
        w = (~kept).float()
        n = w.sum(-1, keepdim=True).clamp_min(1)
        logits = (z * w).sum(-1, keepdim=True) / n + torch.log(n)
        values = ((w @ v.float()) / n).unsqueeze(-2)
        out, lse_k = merge_tokens(out, lse_k, logits, values)
    if tail == "blocks":
        sizes = block_sizes(k.shape[2], layout.block_k, q.device).float()
        kbar = block_sums(k, layout.block_k) / sizes[:, None]
        vbar = block_sums(v, layout.block_k) / sizes[:, None]
        logits = ((qr @ kbar.transpose(-1, -2)) * s + torch.log(sizes)).masked_fill(
            dense, -math.inf
        )
        w = torch.exp(logits - logits.amax(-1, keepdim=True).clamp_min(-1e30))
        part = (w @ vbar) / w.sum(-1, keepdim=True)
        lse_t = torch.logsumexp(logits, -1)
        out, lse_k = merge_tokens(out, lse_k, lse_t[..., None], part.unsqueeze(-2))
    return out, lse_k


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="wan-1.3b-480p;wan-14b-720p")
    parser.add_argument("--keep", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    worst = 0.0
    for name in args.shapes.split(";"):
        b, h, n, d = parse_shape(name)
        for layout_name in ("bhnd", "bnhd"):
            shape = (b, h, n, d) if layout_name == "bhnd" else (b, n, h, d)
            q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            if layout_name == "bnhd":
                q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            layout = registry.bind("block-topk", keep=args.keep).selection(q, k, scale=d**-0.5)
            rows = torch.cat(
                [torch.randint(0, n, (96,), device="cuda"), torch.arange(n - 32, n, device="cuda")]
            )
            for tail in ("drop", "uta", "blocks"):
                out = torch.full((b, h, n, d), float("nan"), device="cuda", dtype=torch.bfloat16)
                out, lse = block_sparse_attention(q, k, v, layout, tail, out=out)
                torch.cuda.synchronize()
                unwritten = int((~torch.isfinite(out)).sum())
                ref, ref_lse = reference_rows(q, k, v, layout, tail, rows)
                err = float((out[:, :, rows].float() - ref).norm() / ref.norm())
                lse_err = float((lse[:, :, rows] - ref_lse).abs().max())
                worst = max(worst, err)
                status = "ok" if unwritten == 0 and err < 1e-2 and lse_err < 1e-2 else "FAIL"
                print(
                    f"{status} {name} {layout_name} keep={args.keep} tail={tail}: "
                    f"density={layout.density():.4f} unwritten={unwritten} rel_err={err:.2e} "
                    f"lse_err={lse_err:.2e}",
                    flush=True,
                )
                if status == "FAIL":
                    raise SystemExit(1)
            del q, k, v, out
            torch.cuda.empty_cache()
    print(f"worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()

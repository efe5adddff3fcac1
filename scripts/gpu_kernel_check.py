"""GPU correctness of the fused kernel at Wan shapes: poisoned outputs, sampled rows vs float32.

Usage: python scripts/gpu_kernel_check.py [--shapes wan-1.3b-480p,wan-14b-720p]
"""

from __future__ import annotations

import argparse
import math

import torch

from tailattn.bench import parse_shape
from tailattn.kernels import block_sparse_attention
from tailattn.kernels.scoring import pooled_logits, topk_layout


def reference_rows(q, k, v, layout, tail, rows):
    """float32 token-level evaluation for the given query rows (no permutation)."""
    s = 1 / math.sqrt(q.shape[-1])
    qr = q[:, :, rows].float()
    z = (qr @ k.float().transpose(-1, -2)) * s
    dense = layout.to_dense()[:, :, rows // layout.block_q]
    kept = dense[..., torch.arange(k.shape[2], device=q.device) // layout.block_k]
    logits = [z.masked_fill(~kept, -math.inf)]
    values = [v.float().unsqueeze(2).expand(-1, -1, len(rows), -1, -1)]
    if tail == "uta":
        w = (~kept).float()
        n = w.sum(-1, keepdim=True)
        logits.append(((z * w).sum(-1, keepdim=True) / n.clamp_min(1)) + torch.log(n.clamp_min(1)))
        values.append(((w @ v.float()) / n.clamp_min(1)).unsqueeze(-2))
    if tail == "blocks":
        from tailattn.kernels import block_sums
        from tailattn.layout import block_sizes

        sizes = block_sizes(k.shape[2], layout.block_k, q.device).float()
        kbar = block_sums(k, layout.block_k) / sizes[:, None]
        vbar = block_sums(v, layout.block_k) / sizes[:, None]
        t = (qr @ kbar.transpose(-1, -2)) * s + torch.log(sizes)
        logits.append(t.masked_fill(dense, -math.inf))
        values.append(vbar.unsqueeze(2).expand(-1, -1, len(rows), -1, -1))
    all_logits = torch.cat(logits, -1)
    w = torch.softmax(all_logits, -1)
    out = sum(
        (w[..., a:b, None] * val).sum(-2)
        for (a, b), val in zip(spans([x.shape[-1] for x in logits]), values, strict=True)
    )
    return out, torch.logsumexp(all_logits, -1)


def spans(sizes):
    start = 0
    for size in sizes:
        yield start, start + size
        start += size


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
            layout = topk_layout(pooled_logits(q, k, 128, 128, d**-0.5), args.keep, n, n, 128, 128)
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

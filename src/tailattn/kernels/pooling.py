"""Per-block token sums in one pass: the statistics that block scoring and the tails need.

``block_sums(x, block)`` returns S[b, h, j] = sum of x[b, h, i] over the tokens i of block j
(ragged last block included), in float32. Mean-pooled vectors are S / n_j; the UTA tail uses the
key and value sums directly (DESIGN.md: the mean dropped key is (total - kept sums) / N_d).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_sum_kernel(
    X,
    Out,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    N,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    for start in tl.static_range(0, BLOCK, CHUNK):
        rows = j * BLOCK + start + tl.arange(0, CHUNK)
        ptrs = base + rows[:, None].to(tl.int64) * stride_xn + offs_d[None, :]
        tile = tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    out = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + j * stride_om
    tl.store(out + offs_d, acc)


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of each block of ``block`` tokens.

    Args:
        x: (B, H, N, D) with unit stride on D (a (B, N, H, D) tensor viewed as bhnd is fine).
        block: tokens per block (power of two, >= 16).

    Returns:
        (B, H, ceil(N / block), D) float32.
    """
    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        raise ValueError("block_sums needs unit stride on the head dim")
    if d & (d - 1) or block & (block - 1) or block < 16:
        raise ValueError(f"block_sums needs power-of-two D and block >= 16, got D={d}, {block}")
    m = triton.cdiv(n, block)
    out = torch.empty(b, h, m, d, device=x.device, dtype=torch.float32)
    _block_sum_kernel[(m, b * h)](
        x,
        out,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h,
        n,
        BLOCK=block,
        D=d,
        CHUNK=min(block, 32),
    )
    return out

"""Per-block token sums or means in one pass: what block scoring and the tails need.

For block j of ``block`` tokens (the last one ragged, n_j tokens):

    S[b, h, j] = sum_{i in j} x[b, h, i]        (``block_sums``, float32)
    M[b, h, j] = S[b, h, j] / n_j               (``block_means``, in any float dtype)
    A[b, h, j] = mean_{i in j} |x[b, h, i] - M[b, h, j]|   (``block_spread``, element-wise)

Rectified SpaAttn's gain test uses the spread A beside the mean. The UTA tail uses key and value
sums directly (docs/methods.md: the mean dropped key is
(total - kept sums) / N_d); pooled scoring and the ``blocks`` tail use means.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_reduce_kernel(
    X, Out, LogCount,
    stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_om,
    H, N,
    BLOCK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, MEAN: tl.constexpr,
    WRITE_LOG_COUNT: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    base = X + b * stride_xb + h * stride_xh
    for start in tl.static_range(0, BLOCK, CHUNK):
        rows = j * BLOCK + start + tl.arange(0, CHUNK)
        ptrs = base + rows[:, None].to(tl.int64) * stride_xn + offs_d[None, :]
        tile = tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    count = tl.minimum(BLOCK, N - j * BLOCK).to(tl.float32)
    if MEAN:
        acc = acc / count
    out = Out + b * stride_ob + h * stride_oh + j * stride_om
    tl.store(out + offs_d, acc.to(Out.dtype.element_ty))
    if WRITE_LOG_COUNT:  # noqa: SIM102 (a constexpr and a run-time test)
        if bh == 0:
            tl.store(LogCount + j, tl.log(count))


def _reduce(
    x: torch.Tensor, block: int, out: torch.Tensor, mean: bool, log_count: torch.Tensor | None
) -> torch.Tensor:
    b, h, n, d = x.shape
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("block reductions need a unit stride on the head dim")
    if d & (d - 1) or block & (block - 1) or block < 16:
        raise ValueError(f"block reductions need power-of-two D and block >= 16, got {d}, {block}")
    _block_reduce_kernel[(out.shape[2], b * h)](
        x, out, out if log_count is None else log_count,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, n, BLOCK=block, D=d, CHUNK=min(block, 32), MEAN=mean,
        WRITE_LOG_COUNT=log_count is not None,
    )  # fmt: skip
    return out


def block_sums(x: torch.Tensor, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of each block of ``block`` tokens.

    Args:
        x: (B, H, N, D) with unit stride on D (a (B, N, H, D) tensor viewed as bhnd is fine).
        block: tokens per block (power of two, >= 16).
        out: optional float32 (B, H, ceil(N / block), D) destination with unit stride on D.

    Returns:
        (B, H, ceil(N / block), D) float32.
    """
    b, h, n, d = x.shape
    if out is None:
        out = torch.empty(b, h, triton.cdiv(n, block), d, device=x.device, dtype=torch.float32)
    return _reduce(x, block, out, mean=False, log_count=None)


def block_means(
    x: torch.Tensor, block: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each block and the log of its token count.

    Returns:
        means (B, H, ceil(N / block), D) in ``dtype`` and log n_j (ceil(N / block),) float32.
    """
    b, h, n, d = x.shape
    m = triton.cdiv(n, block)
    out = torch.empty(b, h, m, d, device=x.device, dtype=dtype)
    log_count = torch.empty(m, device=x.device, dtype=torch.float32)
    return _reduce(x, block, out, mean=True, log_count=log_count), log_count


@triton.jit
def _block_spread_kernel(
    X, Mean, Spread,
    stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_om,
    H, N,
    BLOCK: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    base = X + b * stride_xb + h * stride_xh
    total = tl.zeros([D], dtype=tl.float32)
    for start in tl.static_range(0, BLOCK, CHUNK):
        rows = j * BLOCK + start + tl.arange(0, CHUNK)
        tile = tl.load(
            base + rows[:, None].to(tl.int64) * stride_xn + offs_d[None, :],
            mask=rows[:, None] < N,
            other=0.0,
        )
        total += tl.sum(tile.to(tl.float32), axis=0)
    count = tl.minimum(BLOCK, N - j * BLOCK).to(tl.float32)
    mean = total / count
    spread = tl.zeros([D], dtype=tl.float32)
    for start in tl.static_range(0, BLOCK, CHUNK):  # the block is in cache: a second read is cheap
        rows = j * BLOCK + start + tl.arange(0, CHUNK)
        ok = rows[:, None] < N
        tile = tl.load(
            base + rows[:, None].to(tl.int64) * stride_xn + offs_d[None, :], mask=ok, other=0.0
        )
        spread += tl.sum(tl.where(ok, tl.abs(tile.to(tl.float32) - mean[None, :]), 0.0), axis=0)
    out = b * stride_ob + h * stride_oh + j * stride_om + offs_d
    tl.store(Mean + out, mean)
    tl.store(Spread + out, spread / count)


def block_spread(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean absolute deviation of each block, element-wise, in one launch.

    Args:
        x: (B, H, N, D) with unit stride on D; D and ``block`` powers of two, block >= 16.

    Returns:
        means and spreads, (B, H, ceil(N / block), D) float32 each.
    """
    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        raise ValueError("block_spread needs a unit stride on the head dim")
    if d & (d - 1) or block & (block - 1) or block < 16:
        raise ValueError(f"block_spread needs power-of-two D and block >= 16, got {d}, {block}")
    m = triton.cdiv(n, block)
    mean = torch.empty(b, h, m, d, device=x.device, dtype=torch.float32)
    spread = torch.empty_like(mean)
    _block_spread_kernel[(m, b * h)](
        x, mean, spread,
        x.stride(0), x.stride(1), x.stride(2), mean.stride(0), mean.stride(1), mean.stride(2),
        h, n, BLOCK=block, D=d, CHUNK=min(block, 32),
    )  # fmt: skip
    return mean, spread

r"""Triton kernels of the batched k-means (:mod:`tailattn.select.kmeans`): no host sync, no atomics.

Every (batch, head) ``bh`` is clustered on its own: each program reads one ``bh``'s tokens and
centroids only, so a (b, h) gets bitwise the same result wherever it sits in the batch. One
Lloyd step is four launches, none of which synchronizes with the host (CUDA-graph capturable):

1. ``_assign_kernel``, one program per tile t of ``BLOCK_N`` tokens: for every centroid tile of
   ``BLOCK_C`` (looped, the N x C distances are never stored)

       dist_ic = ||mu_c||^2 - 2 x_i . mu_c,     label_i = argmin_c dist_ic  (ties: lowest c),

   then the tile's label histogram ``hist[bh, c, t]`` (integer counts).
   Precision: the dot runs on tensor cores with float32 accumulation; its operands are x in its
   own dtype (exact) and mu rounded to it (bfloat16: 8 significant bits, relative error <= 2^-9;
   float16: 11 bits, <= 2^-12), or for float32 x both truncated to tf32 (11 bits, < 2^-10);
   ||mu_c||^2 is float32 from the float32 centroid. So the distance error is about
   2^-8 |x_i| |mu_c| in bfloat16 (2^-9 tf32, 2^-11 float16) plus float32 rounding: only
   centroids that close in distance can swap places against exact arithmetic, and they do so
   the same way on every run.
2. ``torch.cumsum`` of ``hist`` flattened in (bh, c, t) order (integers: exact in any order):
   ``prefix[bh, c, t]`` counts the tokens before and in (bh, c, t) of a sort by (bh, label, token).
   Each bh holds exactly N tokens, so cluster c of bh occupies the run
   [prefix[bh, c-1, T-1], prefix[bh, c, T-1]) - bh N of the label-sorted order.
3. ``_scatter_kernel`` (a stable counting sort): token i of tile t with label c goes to

       pos_i = prefix[bh, c, t] - hist[bh, c, t] - bh N + #{j < i in tile t : label_j = c},

   ``perm[bh, pos_i] = i``: the same permutation as ``argsort(labels, stable=True)``.
4. ``_segment_kernel``, one program per cluster: sums its contiguous run of ``perm`` in chunks of
   ``CHUNK`` tokens, in token order, in float32 (a fixed order: deterministic), then writes the
   mean (an empty cluster keeps its centroid), its copy in the dot dtype and its squared norm
   for the next assignment.

Cost per Lloyd step and bh: 2 N C D flops on tensor cores (C padded to the tile), x read twice
(assignment, and the sums through ``perm``), the centroids read once per token tile (from L2),
O(N + C N / BLOCK_N) integers. At Wan2.1-1.3B 480p (H = 12, N = 32,760, D = 128, C = 130 + 434)
that is 57 GFLOP (64 padded) and ~0.4 GB in bfloat16 for q and k together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .runtime import interpreting

MAX_HEAD_DIM = 256
"""Largest head dim the kernels take (a token tile and the centroid stages stay on chip)."""


@triton.jit
def _assign_kernel(
    X, Cent, Norm, Labels, Hist,
    sxb, sxh, sxn,
    H, N, C, T,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    offs_c = tl.arange(0, BLOCK_C)
    x = tl.load(
        X + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxn + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:  # the CPU interpreter mis-multiplies 16-bit floats
        x = x.to(tl.float32)
    cent = Cent + bh * C * D
    norm = Norm + bh * C
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    label = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        c_ok = cols < C
        mu = tl.load(
            cent + cols[None, :].to(tl.int64) * D + offs_d[:, None],
            mask=c_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            mu = mu.to(tl.float32)
        dots = tl.dot(x, mu, input_precision=PRECISION)
        dist = tl.load(norm + cols, mask=c_ok, other=float("inf"))[None, :] - 2.0 * dots
        tile_min = tl.min(dist, axis=1)
        tile_arg = tl.min(tl.where(dist == tile_min[:, None], cols[None, :], C), axis=1)
        better = tile_min < best  # strict: a tie keeps the earlier (lower) cluster id
        best = tl.where(better, tile_min, best)
        label = tl.where(better, tile_arg, label)
    tl.store(Labels + bh * N + rows, label.to(Labels.dtype.element_ty), mask=row_ok)
    label = tl.where(row_ok, label, -1)
    hist = Hist + bh * C * T + t
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        counts = tl.sum((label[:, None] == cols[None, :]).to(tl.int32), axis=0)
        tl.store(hist + cols.to(tl.int64) * T, counts.to(Hist.dtype.element_ty), mask=cols < C)


@triton.jit
def _scatter_kernel(
    Labels, Hist, Prefix, Perm, N, C, T, BLOCK_N: tl.constexpr, RANK_CHUNK: tl.constexpr
):  # fmt: skip
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    rows = t * BLOCK_N + offs
    row_ok = rows < N
    labels = Labels + bh * N + t * BLOCK_N
    label = tl.load(labels + offs, mask=row_ok, other=-1).to(tl.int32)
    slot = bh * C * T + tl.where(row_ok, label, 0).to(tl.int64) * T + t
    start = tl.load(Prefix + slot, mask=row_ok, other=0).to(tl.int64)
    start -= tl.load(Hist + slot, mask=row_ok, other=0).to(tl.int64) + bh * N
    # rank among the earlier tokens of this tile with the same label (stability)
    rank = tl.zeros([BLOCK_N], dtype=tl.int32)
    for j0 in tl.static_range(0, BLOCK_N, RANK_CHUNK):
        offs_j = j0 + tl.arange(0, RANK_CHUNK)
        other = tl.load(labels + offs_j, mask=t * BLOCK_N + offs_j < N, other=-2).to(tl.int32)
        same = (label[:, None] == other[None, :]) & (offs_j[None, :] < offs[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    tl.store(Perm + bh * N + start + rank, rows.to(Perm.dtype.element_ty), mask=row_ok)


@triton.jit
def _segment_kernel(
    X, Perm, Prefix, Old, Out, OutDot, OutNorm,
    sxb, sxh, sxn,
    H, N, C, T,
    D: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr, UPDATE: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    before = bh * N
    last = Prefix + bh * C * T + c * T + T - 1  # prefix count at the end of cluster c
    end = (tl.load(last) - before).to(tl.int32)
    start = (tl.load(last - T, mask=c > 0, other=before) - before).to(tl.int32)
    offs_r = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    x = X + b * sxb + h * sxh
    perm = Perm + before
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for r0 in range(start, end, CHUNK):
        r = r0 + offs_r
        r_ok = r < end
        tok = tl.load(perm + r, mask=r_ok, other=0).to(tl.int64)
        rows = tl.load(
            x + tok[:, None] * sxn + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc += tl.sum(rows.to(tl.float32), axis=0)
    out = (bh * C + c) * D + offs_d
    if UPDATE:
        size = end - start
        old = tl.load(Old + out, mask=d_ok, other=0.0)
        mean = tl.where(size > 0, acc / tl.maximum(size, 1).to(tl.float32), old)
        tl.store(Out + out, mean, mask=d_ok)
        tl.store(OutDot + out, mean.to(OutDot.dtype.element_ty), mask=d_ok)
        tl.store(OutNorm + bh * C + c, tl.sum(mean * mean, axis=0))
    else:
        tl.store(Out + out, acc, mask=d_ok)


@triton.jit
def _prepare_kernel(
    Cent, OutDot, OutNorm, ROWS, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    ok = (rows < ROWS)[:, None] & (offs_d < D)[None, :]
    at = rows[:, None].to(tl.int64) * D + offs_d[None, :]
    mu = tl.load(Cent + at, mask=ok, other=0.0)
    tl.store(OutDot + at, mu.to(OutDot.dtype.element_ty), mask=ok)
    tl.store(OutNorm + rows, tl.sum(mu * mu, axis=1), mask=rows < ROWS)


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype centroids are rounded to for the distance dot: x's own 16-bit dtype, else
    float32 (multiplied as tf32)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


@dataclass(frozen=True)
class Centroids:
    """Centroids (B, H, C, D) float32, their copy in the dot dtype, squared norms (B, H, C)."""

    values: torch.Tensor
    dot: torch.Tensor
    norms: torch.Tensor


@dataclass(frozen=True)
class Sorted:
    """A labelling and its stable counting sort.

    labels (B, H, N), perm (B, H, N): ``perm[b, h, j]`` is the j-th token in (label, token)
    order; hist (B, H, C, T): tokens of cluster c in token tile t; prefix (B, H, C, T): its
    inclusive prefix sums in (b, h, c, t) order (see the module docstring).
    """

    labels: torch.Tensor
    perm: torch.Tensor
    hist: torch.Tensor
    prefix: torch.Tensor


@dataclass(frozen=True)
class Tiles:
    """Launch sizes: tokens per assignment tile, centroids per distance tile, tokens per chunk
    of a segment sum, warps and pipeline stages of the assignment."""

    block_n: int = 128
    block_c: int = 64
    chunk: int = 64
    warps: int = 4
    stages: int = 3

    @classmethod
    def default(cls, head_dim: int, dtype: torch.dtype) -> Tiles:
        """Small tiles in the interpreter. On the GPU 128 tokens x 64 centroids for rows of up
        to 256 bytes in the dot dtype (head dim 128 in 16 bits); wider rows get smaller tiles,
        so the token tile and the centroid stages stay within shared memory (<= 128 KiB)."""
        if interpreting():
            return cls(block_n=32, block_c=16, chunk=16)
        row = _pad(head_dim) * dot_dtype(dtype).itemsize
        if row <= 256:
            return cls()
        if row <= 512:
            return cls(block_n=64)
        return cls(block_n=64, block_c=32, stages=2)


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def prepare(values: torch.Tensor, dtype: torch.dtype) -> Centroids:
    """Centroids ready for :func:`assign_and_sort` from float32 (B, H, C, D) values."""
    values = values.to(torch.float32).contiguous()
    b, h, c, d = values.shape
    dot = torch.empty(b, h, c, d, device=values.device, dtype=dot_dtype(dtype))
    norms = torch.empty(b, h, c, device=values.device, dtype=torch.float32)
    rows, block = b * h * c, 16
    _prepare_kernel[(triton.cdiv(rows, block),)](
        values, dot, norms, rows, D=d, D_PAD=_pad(d), BLOCK=block
    )
    return Centroids(values, dot, norms)


def assign_and_sort(
    x: torch.Tensor,
    centroids: Centroids,
    index_dtype: torch.dtype = torch.int64,
    tiles: Tiles | None = None,
) -> Sorted:
    """Nearest centroid of every token and the stable sort of the tokens by it (3 launches).

    Args:
        x: (B, H, N, D) float16, bfloat16 or float32 (any strides; unit stride on D is free).
        centroids: from :func:`prepare` or :func:`update`, (B, H, C, D).
        index_dtype: int32 or int64 for the returned labels and permutation.
        tiles: launch sizes, :meth:`Tiles.default` when omitted.
    """
    x = _unit_stride(x)
    b, h, n, d = x.shape
    c = centroids.values.shape[2]
    tiles = tiles or Tiles.default(d, x.dtype)
    t = triton.cdiv(n, tiles.block_n)
    count_dtype = torch.int32 if b * h * n < 2**31 else torch.int64
    labels = torch.empty(b, h, n, device=x.device, dtype=index_dtype)
    hist = torch.empty(b, h, c, t, device=x.device, dtype=count_dtype)
    upcast = interpreting() and x.dtype != torch.float32
    _assign_kernel[(t, b * h)](
        x, centroids.dot, centroids.norms, labels, hist,
        x.stride(0), x.stride(1), x.stride(2),
        h, n, c, t,
        D=d, D_PAD=_pad(d), BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c,
        PRECISION="tf32", UPCAST=upcast, num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    prefix = torch.cumsum(hist.view(-1), 0, dtype=count_dtype).view(b, h, c, t)
    perm = torch.empty(b, h, n, device=x.device, dtype=index_dtype)
    _scatter_kernel[(t, b * h)](
        labels, hist, prefix, perm, n, c, t,
        BLOCK_N=tiles.block_n, RANK_CHUNK=min(32, tiles.block_n), num_warps=4,
    )  # fmt: skip
    return Sorted(labels, perm, hist, prefix)


def _segments(
    x: torch.Tensor, order: Sorted, old: torch.Tensor, outs: tuple[torch.Tensor, ...], update: bool
) -> None:
    x = _unit_stride(x)
    b, h, n, d = x.shape
    c, t = order.prefix.shape[2:]
    chunk = Tiles.default(d, x.dtype).chunk
    _segment_kernel[(c, b * h)](
        x, order.perm, order.prefix, old, *outs,
        x.stride(0), x.stride(1), x.stride(2),
        h, n, c, t,
        D=d, D_PAD=_pad(d), CHUNK=chunk, UPDATE=update, num_warps=4,
    )  # fmt: skip


def segment_sums(x: torch.Tensor, order: Sorted) -> torch.Tensor:
    """Per-cluster sums (B, H, C, D) float32: each cluster's run of ``order.perm`` in token
    order, chunk by chunk (bitwise reproducible)."""
    b, h, _, d = x.shape
    c = order.prefix.shape[2]
    sums = torch.empty(b, h, c, d, device=x.device, dtype=torch.float32)
    _segments(x, order, sums, (sums, sums, sums), update=False)
    return sums


def update(x: torch.Tensor, order: Sorted, centroids: Centroids) -> Centroids:
    """One Lloyd move: every centroid to its cluster's mean (an empty cluster keeps its own)."""
    values = torch.empty_like(centroids.values)
    dot, norms = torch.empty_like(centroids.dot), torch.empty_like(centroids.norms)
    _segments(x, order, centroids.values, (values, dot, norms), update=True)
    return Centroids(values, dot, norms)


def cluster_sizes(order: Sorted) -> torch.Tensor:
    """Members of every cluster, (B, H, C) int64: the tile histograms summed (exact)."""
    return order.hist.sum(dim=-1, dtype=torch.int64)

r"""Pooled block scoring and the budgeted block selections ``block-topk`` and ``block-topp``.

Tokens are cut into blocks of ``block_q`` queries and ``block_k`` keys (the last block may be
ragged). Each block is represented by its mean, and a key block stands for its n_j tokens:

    qbar_m = mean_{i in m} q_i,   kbar_j = mean_{i in j} k_i,
    P_mj   = softmax_j(s qbar_m . kbar_j + log n_j)                      (pooled block mass)

``P_mj`` estimates the share of the attention mass a query of block m puts on key block j (the
``log n_j`` term is the same count correction as the UTA logit, Eq. 13). ``block-topk`` keeps
the ``ceil(keep * Mk)`` key blocks of largest ``P_mj`` per query block; ``block-topp`` keeps the
smallest set whose pooled mass reaches ``p``.

Every block selection is a frozen dataclass called as
``selection(q, k, *, scale, grid, state=None) -> BlockLayout`` on validated (B, H, N, D) tensors.
Block sizes: any positive integer for the reference executor; the Triton kernels take 64 or 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import accumulation_dtype, check_fraction, triton_installed
from ..layout import BlockLayout, block_sizes, num_blocks
from ..methods import registry


def check_block_size(value: object, name: str) -> int:
    """A block size: a positive integer (the Triton kernels further need 64 or 128)."""
    expected = "a positive integer (64 or 128 for the kernels)"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def block_budget(keep: float, n_blocks: int) -> int:
    """``ceil(keep * n_blocks)`` in [1, n_blocks]; an integral keep * n is not rounded up."""
    return min(n_blocks, max(1, math.ceil(keep * n_blocks - 1e-9)))


def triton_pooling(x: torch.Tensor, block: int) -> bool:
    """The Triton block-mean kernel serves CUDA tensors with power-of-two sizes."""
    d = x.shape[-1]
    if x.device.type != "cuda" or x.dtype == torch.float64 or d & (d - 1) or block & (block - 1):
        return False
    return block >= 16 and triton_installed()


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of every block of ``block`` tokens: (B, H, N, D) -> (B, H, ceil(N / block), D).

    Accumulates in float32 (float64 for float64 input); the ragged last block is averaged over
    its own tokens. On CUDA one Triton pass reads each token once
    (:func:`tailattn.kernels.pooling.block_means`).
    """
    if triton_pooling(x, block):
        from ..kernels.pooling import block_means

        return block_means(x, block)[0]
    b, h, n, d = x.shape
    m = num_blocks(n, block)
    acc = accumulation_dtype(x.dtype)
    padded = x.new_zeros(b, h, m * block, d, dtype=acc)
    padded[:, :, :n] = x
    sums = padded.view(b, h, m, block, d).sum(dim=3)
    return sums / block_sizes(n, block, x.device).to(acc).unsqueeze(-1)


def pooled_logits(
    q: torch.Tensor, k: torch.Tensor, scale: float, block_q: int, block_k: int
) -> torch.Tensor:
    """Pooled block logits ``s qbar_m . kbar_j + log n_j``, (B, H, Mq, Mk)."""
    qbar, kbar = pool_blocks(q, block_q), pool_blocks(k, block_k)
    counts = block_sizes(k.shape[2], block_k, k.device).to(qbar.dtype)
    return scale * torch.matmul(qbar, kbar.transpose(-1, -2)) + torch.log(counts)


def pooled_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, block_q: int, block_k: int
) -> torch.Tensor:
    """Pooled block masses ``P_mj = softmax_j(s qbar_m . kbar_j + log n_j)``, (B, H, Mq, Mk)."""
    return torch.softmax(pooled_logits(q, k, scale, block_q, block_k), dim=-1)


def layout_from_ranking(
    ranked: torch.Tensor,
    counts: torch.Tensor,
    n_q: int,
    n_k: int,
    block_q: int,
    block_k: int,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
) -> BlockLayout:
    """A layout keeping the first ``counts`` entries of each ranked row.

    Args:
        ranked: (B, H, Mq, R) key-block ids, most wanted first, no repeats.
        counts: (B, H, Mq) how many to keep, in [1, R].

    The kept ids of a row are stored in ascending order (key blocks are then visited in memory
    order); padding slots hold 0. Off the CPU the rows are padded to R slots (no device sync to
    find the longest row). Counts in [1, R] and distinct ids make the layout valid by
    construction.
    """
    if ranked.device.type == "cpu":  # short rows for the reference executor; no sync to avoid
        ranked = ranked[..., : max(1, int(counts.max()))]
    valid = torch.arange(ranked.shape[-1], device=ranked.device) < counts.unsqueeze(-1)
    big = num_blocks(n_k, block_k)
    ordered = ranked.masked_fill(~valid, big).sort(dim=-1).values
    indices = ordered.masked_fill(ordered == big, 0)
    return BlockLayout(
        indices.to(torch.int32),
        counts.to(torch.int32),
        n_q,
        n_k,
        block_q,
        block_k,
        q_perm,
        kv_perm,
        check=False,
    )


def top_mass_counts(probs_sorted: torch.Tensor, p: float, minimum: int = 1) -> torch.Tensor:
    """Length of the shortest descending prefix whose mass reaches p, at least ``minimum``.

    ``probs_sorted`` (..., R) sorted in descending order; returns (...,) int64.
    """
    mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
    counts = (mass_before < p).sum(dim=-1)
    return counts.clamp(min=minimum, max=probs_sorted.shape[-1])


@registry.selection("block-topk", granularity="block", summary="top ceil(keep*Mk) pooled blocks")
@dataclass(frozen=True)
class BlockTopK:
    """Per query block, the ``ceil(keep * Mk)`` key blocks of largest pooled mass."""

    keep: float
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        check_fraction(self.keep, "keep")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: Any = None,
    ) -> BlockLayout:
        scores = pooled_logits(q, k, scale, self.block_q, self.block_k)
        budget = block_budget(self.keep, scores.shape[-1])
        kept = scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values
        counts = torch.full(scores.shape[:3], budget, dtype=torch.int32, device=scores.device)
        # distinct, in-range ids and a full count by construction: skip the validation syncs
        return BlockLayout(
            kept.to(torch.int32),
            counts,
            q.shape[2],
            k.shape[2],
            self.block_q,
            self.block_k,
            check=False,
        )


@registry.selection("block-topp", granularity="block", summary="pooled block mass >= p")
@dataclass(frozen=True)
class BlockTopP:
    """Per query block, the fewest key blocks whose pooled mass ``P_mj`` reaches ``p``."""

    p: float = 0.9
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        check_fraction(self.p, "p")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: Any = None,
    ) -> BlockLayout:
        probs, ranked = pooled_scores(q, k, scale, self.block_q, self.block_k).sort(
            dim=-1, descending=True, stable=True
        )
        counts = top_mass_counts(probs, self.p)
        return layout_from_ranking(
            ranked, counts, q.shape[2], k.shape[2], self.block_q, self.block_k
        )

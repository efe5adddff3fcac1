"""Kept masks of every study selection on a :class:`~tailattn.study.chunk.Chunk`.

Oracle selections keep a prefix of each row's sorted logits, so they are thresholds on the
shared sort: ``topk`` keeps the ``ceil(keep * N)`` largest logits (the library's
:meth:`~tailattn.select.TopK.budget`), ``topp`` the shortest prefix whose exact mass reaches p,
``threshold`` the logits >= max + log(lam). A prefix is known by its length per row, which the
single-token tails use for O(1) lookups. (Keys tied with the smallest kept logit are all kept;
with continuous logits ties do not occur.) Any other token selection is called on the logits.

Block selections build their layout once per head from all of q and k (as
:func:`tailattn.attention` does); a sampled row then keeps every key of the key blocks its query
block keeps, which is exactly what the block executor computes for that row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..layout import BlockLayout
from ..permute import invert_permutation
from ..select import Threshold, TopK, TopP
from .chunk import Chunk


@dataclass
class Kept:
    """A kept mask (Cq, N) and, for prefix selections, the kept count per row (Cq,)."""

    mask: torch.Tensor
    counts: torch.Tensor | None = None


def prefix(chunk: Chunk, counts: torch.Tensor) -> Kept:
    counts = counts.clamp(1, chunk.n)
    return Kept(chunk.z >= chunk.threshold(counts).unsqueeze(-1), counts)


@dataclass(frozen=True)
class TokenMask:
    """A token (oracle) selection object from the registry."""

    selection: Any

    def __call__(self, chunk: Chunk) -> Kept:
        sel, rows = self.selection, chunk.z.shape[0]
        if isinstance(sel, TopK):
            return prefix(chunk, torch.full((rows,), sel.budget(chunk.n), device=chunk.z.device))
        if isinstance(sel, TopP):
            before = chunk.p_prefix[:, :-1]
            return prefix(chunk, (before < sel.p).sum(dim=-1))
        if isinstance(sel, Threshold):
            floor = chunk.z_sorted[:, :1] + math.log(sel.lam)
            return prefix(chunk, (chunk.z_sorted >= floor).sum(dim=-1))
        return Kept(sel(chunk.z))


def _positions(perm: torch.Tensor | None, n: int) -> torch.Tensor:
    """(N,) position of every original token in the permuted order (one head)."""
    if perm is None:
        return torch.arange(n)
    return invert_permutation(perm if perm.ndim == 1 else perm[0, 0])


@dataclass(frozen=True)
class BlockMask:
    """A block layout of one head (B = H = 1), as a token mask of any query rows.

    Attributes:
        kept_blocks: (Mq, Mk) bool.
        q_block: (N,) query block of every original query token.
        k_block: (N,) key block of every original key token.
    """

    kept_blocks: torch.Tensor
    q_block: torch.Tensor
    k_block: torch.Tensor

    @classmethod
    def from_layout(cls, layout: BlockLayout) -> BlockMask:
        if layout.batch_heads != (1, 1):
            raise ValueError(f"expected a one-head layout, got {layout.batch_heads}")
        q_pos = _positions(layout.q_perm, layout.n_q)
        k_pos = _positions(layout.kv_perm, layout.n_k)
        return cls(layout.to_dense()[0, 0], q_pos // layout.block_q, k_pos // layout.block_k)

    @property
    def n_groups(self) -> int:
        return self.kept_blocks.shape[-1]

    def __call__(self, chunk: Chunk) -> Kept:
        rows = self.kept_blocks[self.q_block[chunk.rows]]
        return Kept(rows[:, self.k_block])

    def key_groups(self, chunk: Chunk, kept: Kept) -> tuple[torch.Tensor, int]:
        """(Cq, N) key block of every key and the block count: the groups of ``blocks``."""
        return self.k_block.expand(chunk.z.shape[0], -1), self.n_groups

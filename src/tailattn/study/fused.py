"""Fused selections in the study: the loop's kept tiles, Rectified SpaAttn's R and C.

``blasst`` and ``recall`` decide per (query tile, key tile) inside the loop; the study runs the
loop for the query tiles that hold sampled rows only
(:meth:`tailattn.select.dynamic.TileLoop.layout`) and evaluates the kept tiles with the usual
block tails (``drop``, ``uta``, ``moment``, ``blocks``), exactly as the executor merges them.

``rectified`` is its own tail: per sampled row i of query block m, from the chunk's exact
logits, ``O_i = R_m O_drop_i + C_m`` (O_drop: attention normalized over the critical blocks,
:func:`tailattn.select.rectified.Rectified.plan` gives R, C). Its implied distribution gives a
kept key R p_i / r (r: exact kept mass), a key of a compensated block n its share
P_mn / n_n of the pooled reference, and a key of an unreliable (G) block nothing; ``tokens``
counts the compensated blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..select.dynamic import TileLoop
from ..select.rectified import Rectified, RectifiedPlan
from .selections import BlockMask
from .tails import MaskStats, TailResult, block_tail


@dataclass(frozen=True)
class RectifiedTail:
    """Rectified's output and implied distribution on a chunk (module docstring)."""

    plan: RectifiedPlan
    mask: BlockMask

    def __call__(self, stats: MaskStats, want_implied: bool = False) -> TailResult:
        chunk, mask = stats.chunk, self.mask
        q_block = mask.q_block[chunk.rows]
        rescale = self.plan.rescale[0, 0][q_block]
        out = stats.pv_kept / stats.recall.unsqueeze(-1)
        out = rescale.unsqueeze(-1) * out + self.plan.compensation[0, 0][q_block]
        counted = mask.kept_blocks | self.plan.unreliable[0, 0]
        sizes = torch.bincount(mask.k_block, minlength=mask.n_groups).to(chunk.p.dtype)
        share = (self.plan.mass[0, 0] * ~counted) / sizes  # per key of each block
        implied = torch.where(
            stats.kept.mask,
            chunk.p * (rescale / stats.recall).unsqueeze(-1),
            share[q_block][:, mask.k_block],
        )
        tv = 0.5 * (chunk.p - implied).abs().sum(dim=-1)
        tokens = (~counted).sum(dim=-1).to(chunk.p.dtype)[q_block]
        return TailResult(out, tv, tokens, implied if want_implied else None)


def fused_job(
    selection: Any,
    tails: Sequence[tuple[Any, str]],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    grid: tuple[int, int, int] | None,
    rows: torch.Tensor,
) -> tuple[BlockMask, list]:
    """The mask and the (pair, tail evaluator) list of a fused selection on one unit.

    ``tails``: (pair, block tail object) of every pair of this selection; ``qkv`` (1, 1, N, D)
    each.
    """
    q, k, v = qkv
    if isinstance(selection, Rectified):
        plan = selection.plan(q, k, v, scale, selection.check(q, k, grid))
        mask = BlockMask.from_layout(plan.layout)
        return mask, [(pair, RectifiedTail(plan, mask)) for pair, _ in tails]
    if isinstance(selection, TileLoop):
        tiles = torch.unique(rows // selection.block_q)
        layout = selection.layout(q, k, v, scale=scale, query_blocks=tiles)
        mask = BlockMask.from_layout(layout)
        return mask, [(pair, block_tail(tail, mask.key_groups)) for pair, tail in tails]
    raise ValueError(f"the study cannot evaluate the fused selection {type(selection).__name__}")

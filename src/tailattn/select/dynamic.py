r"""In-loop dynamic skipping: ``blasst`` (fixed threshold) and ``recall`` (fixed recall, ours).

A reference of what a flash-attention kernel does: for every query tile (``block_q`` rows, the
rows one program owns) it walks the key tiles (``block_k`` keys) keeping a running max m_i, a
running sum l_i and an accumulator per row. For the next key tile j it computes the logits
z_ij = s q_i . k_j and the tile max t_i = max_{j in tile} z_ij, then either skips the tile (no
exp, no V load, no P.V, m, l and acc untouched) or folds it in:

    m'_i = max(m_i, t_i),  l_i <- l_i e^{m_i - m'_i} + sum_j e^{z_ij - m'_i},
    acc_i <- acc_i e^{m_i - m'_i} + sum_j e^{z_ij - m'_i} v_j.

The decision is per (query tile, key tile), as in a kernel, and is made for all rows at once:

* ``blasst`` (BLASST): key tiles in memory order, the first never skipped; skip when for every
  valid row ``t_i < m_i + log(lam)``. Skipped mass is lost. ``lam -> 0`` never skips (full
  attention).
* ``recall`` (seed 002's fixed recall; its method text is not public, this design is ours):
  key tiles in descending pooled score ``s qbar . kbar_j + log n_j`` (the query tile's mean
  query against the key tile's mean key), so that the large mass comes first. Each row keeps a
  bound sigma_i on the mass it has skipped, in the scale of l_i (rescaled with l when m moves).
  A tile's mass is at most ``n_j e^{t_i - m_i}`` (its size times its max). The skip budget
  of a row is ``(1 - r) / r * l_i - sigma_i``, and it is shared evenly over the R tiles not yet
  visited: skip the tile when for every valid row

      n_j e^{t_i - m_i} <= ((1 - r) / r * l_i - sigma_i) / R,

  and add the bound to sigma_i. The share keeps the budget for the many small tiles at the end
  of the order instead of spending it on the first tile that fits (with ``bound="exact"`` on
  the stand-in Wan data of scripts/seed_methods_report.py, 16-20x lower MSE than spending
  greedily at the same density, r = 0.8..0.95, 2026-11-28). Either way
  sigma_i <= (1 - r) / r * l_i: the skipped mass stays within (1 - r) of the running
  denominator l_i + sigma_i. Since l only grows, the skipped mass S is at most (1 - r) / r
  times the final kept mass L, hence the achieved recall L / (L + S) >= r: the target is a
  guarantee, not an estimate, for any input.
  The max bound is loose (up to n_j times the tile's mass), so ``bound="exact"`` accounts a
  tile by its exact mass ``sum_j e^{z_ij - m_i}`` instead: the kernel then still computes the
  tile's exp but skips the V load and P.V (half the FLOPs), and skips far more tiles at the
  same guarantee.

Tails (``+uta``, ``+blocks``, ``+moment``): the skipped tiles of a query tile are its dropped
key blocks; their pooled tokens join the softmax exactly as for block selections
(:mod:`tailattn.tails.block`), so a skipped tile's mass is no longer lost.

Info entries (with ``return_info``), per query and per head: ``density`` (computed keys / Nk),
``recall`` (exact kept mass, against exact logits) and ``recall_bound`` (the loop's own
guaranteed lower bound ``l / (l + sigma)``); ``target_recall`` for ``recall``; ``layout`` (the
kept tiles as a :class:`~tailattn.layout.BlockLayout`).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import accumulation_dtype, check_fraction, check_positive
from ..layout import BlockLayout, block_sizes, num_blocks
from ..methods import registry
from ..parts import merge_tokens
from ..reference.full import full_attention
from ..reference.streaming import DEFAULT_CHUNK_BYTES
from ..tails.block import BlockDrop, BlockTail, key_block_sums, to_blocks
from .blocks import check_block_size, pooled_logits
from .fused import FusedResult


@dataclass(frozen=True)
class LoopResult:
    """What the tile loop computed, per query tile (B, H, Mq, ...), queries padded to Mq * bq.

    ``out`` (.., bq, Dv) and ``lse`` (.., bq) of the computed tiles, ``kept`` (.., Mk) bool,
    ``skipped`` (.., bq): the bound sigma on the skipped mass, relative to e^lse.
    """

    out: torch.Tensor
    lse: torch.Tensor
    kept: torch.Tensor
    skipped: torch.Tensor


class TileLoop(abc.ABC):
    """Base of the loop selections: the flash-attention walk with a skip rule."""

    block_q: int
    block_k: int

    @property
    def exact_mass(self) -> bool:
        """Account a skipped tile by its exact mass (exp computed) instead of the max bound."""
        return False

    @abc.abstractmethod
    def order(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Visiting order of the key tiles per query tile, (B, H, Mq, Mk) int64."""

    @abc.abstractmethod
    def skip(
        self,
        tile_max: torch.Tensor,
        m: torch.Tensor,
        lsum: torch.Tensor,
        sigma: torch.Tensor,
        bound: torch.Tensor,
        remaining: int,
    ) -> torch.Tensor:
        """Per-row skip wish (B, H, c, bq) bool; the tile is skipped when all valid rows agree."""

    def walk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> LoopResult:
        """The loop over key tiles for every query tile (module docstring)."""
        b, h, n_q, d = q.shape
        n_k, dv = k.shape[2], v.shape[-1]
        bq, bk = self.block_q, self.block_k
        mq, mk = num_blocks(n_q, bq), num_blocks(n_k, bk)
        order = self.order(q, k, scale)
        q_blocks, k_blocks, v_blocks = to_blocks(q, bq), to_blocks(k, bk), to_blocks(v, bk)
        row_valid = (torch.arange(mq * bq, device=q.device) < n_q).view(mq, bq)
        key_valid = (torch.arange(mk * bk, device=q.device) < n_k).view(mk, bk)
        sizes = block_sizes(n_k, bk, q.device).to(q.dtype)
        out = q.new_empty(b, h, mq, bq, dv)
        lse = q.new_empty(b, h, mq, bq)
        kept = torch.zeros(b, h, mq, mk, dtype=torch.bool, device=q.device)
        skipped = q.new_empty(b, h, mq, bq)
        per_block = b * h * bq * (bk * 3 + d + dv) * q.element_size()
        step = max(1, DEFAULT_CHUNK_BYTES // per_block)
        for start in range(0, mq, step):
            rows = slice(start, min(start + step, mq))
            qc, rv = q_blocks[:, :, rows], row_valid[rows]
            c = qc.shape[2]
            m = qc.new_full((b, h, c, bq), float("-inf"))
            lsum = qc.new_zeros(b, h, c, bq)
            sigma = qc.new_zeros(b, h, c, bq)
            acc = qc.new_zeros(b, h, c, bq, dv)
            for visit in range(mk):
                j = order[:, :, rows, visit]  # (B, H, c)
                kt = k_blocks.gather(2, j[..., None, None].expand(b, h, c, bk, d))
                vt = v_blocks.gather(2, j[..., None, None].expand(b, h, c, bk, dv))
                z = scale * qc @ kt.mT
                z = z.masked_fill(~key_valid[j].unsqueeze(-2), float("-inf"))
                tile_max = z.amax(dim=-1)
                shifted = torch.where(torch.isfinite(m), m, tile_max)
                if self.exact_mass:
                    bound = torch.exp(z - shifted.unsqueeze(-1)).sum(dim=-1)
                else:
                    bound = sizes[j].unsqueeze(-1) * torch.exp(tile_max - shifted)
                wish = self.skip(tile_max, m, lsum, sigma, bound, mk - visit) | ~rv
                drop = wish.all(dim=-1) if visit else torch.zeros_like(wish[..., 0])
                new_m = torch.maximum(m, tile_max)
                alpha = torch.exp(m - new_m)
                p = torch.exp(z - new_m.unsqueeze(-1))
                keep_rows = ~drop.unsqueeze(-1)
                lsum = torch.where(keep_rows, lsum * alpha + p.sum(dim=-1), lsum)
                acc = torch.where(keep_rows.unsqueeze(-1), acc * alpha.unsqueeze(-1) + p @ vt, acc)
                sigma = torch.where(keep_rows, sigma * alpha, sigma + bound)
                m = torch.where(keep_rows, new_m, m)
                kept[:, :, rows].scatter_(-1, j.unsqueeze(-1), (~drop).unsqueeze(-1))
            out[:, :, rows] = acc / lsum.unsqueeze(-1)
            lse[:, :, rows] = m + torch.log(lsum)
            skipped[:, :, rows] = sigma / lsum
        return LoopResult(out, lse, kept, skipped)

    def layout(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        query_blocks: torch.Tensor | None = None,
    ) -> BlockLayout:
        """The loop's decisions as a layout: the key tiles each query tile computed.

        With ``query_blocks`` (1-D ids) only those query tiles walk the loop, the others are
        marked as keeping every key tile (for callers that look at a sample of rows only).
        """
        acc = accumulation_dtype(q.dtype)
        n_q, n_k = q.shape[2], k.shape[2]
        if query_blocks is None:
            kept = self.walk(q.to(acc), k.to(acc), v.to(acc), scale).kept
            return BlockLayout.from_dense(kept, n_q, n_k, self.block_q, self.block_k)
        bq = self.block_q
        rows = torch.cat([torch.arange(m * bq, min(m * bq + bq, n_q)) for m in query_blocks])
        part = self.walk(q[:, :, rows].to(acc), k.to(acc), v.to(acc), scale).kept
        b, h = q.shape[:2]
        kept = torch.ones(b, h, num_blocks(n_q, bq), part.shape[-1], dtype=torch.bool)
        kept[:, :, query_blocks.to(torch.int64)] = part.cpu()
        return BlockLayout.from_dense(kept.to(q.device), n_q, n_k, bq, self.block_k)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tail: BlockTail,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: Any = None,
        with_stats: bool = False,
        backend: str | None = None,
    ) -> FusedResult:
        from ..execute import check_values

        if backend == "triton":
            raise ValueError(f"backend='triton': {type(self).__name__} has no kernel yet")
        check_values(q, k, v)
        acc = accumulation_dtype(q.dtype)
        qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
        b, h, n_q, _ = q.shape
        n_k = k.shape[2]
        loop = self.walk(qa, ka, va, scale)
        out, lse = loop.out, loop.lse
        if not isinstance(tail, BlockDrop):
            kept = loop.kept.to(acc)
            summary = tail.prepare(key_block_sums(ka, va, self.block_k, tail.second_moments), kept)
            tokens = tail.tokens(
                summary, to_blocks(qa, self.block_q), slice(None), loop.kept, scale
            )
            out, lse = merge_tokens(out, lse, tokens.logits, tokens.values)

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, h, -1, *x.shape[4:])[:, :, :n_q]

        layout = BlockLayout.from_dense(loop.kept, n_q, n_k, self.block_q, self.block_k)
        kept_keys = loop.kept.to(acc) @ block_sizes(n_k, self.block_k, q.device).to(acc)
        density = (kept_keys / n_k).unsqueeze(-1).expand(b, h, -1, self.block_q)
        info: dict[str, Any] = {"density": layout.density(), "layout": layout}
        stats: dict[str, torch.Tensor] = {}
        if with_stats:
            full_lse = full_attention(qa, ka, va, scale, return_lse=True)[1]
            stats = {
                "density": flat(density),
                "recall": torch.exp(flat(loop.lse) - full_lse),
                "recall_bound": 1.0 / (1.0 + flat(loop.skipped)),
            }
        return FusedResult(flat(out), flat(lse), stats, info)


@registry.selection("blasst", granularity="fused", summary="skip key tiles below max + log lam")
@dataclass(frozen=True)
class Blasst(TileLoop):
    """BLASST: skip a key tile when its max logit is below the running max + log(lam)."""

    lam: float = 1e-3
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        check_positive(self.lam, "lam")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def order(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        b, h = q.shape[:2]
        mq, mk = num_blocks(q.shape[2], self.block_q), num_blocks(k.shape[2], self.block_k)
        return torch.arange(mk, device=q.device).expand(b, h, mq, mk)

    def skip(self, tile_max, m, lsum, sigma, bound, remaining) -> torch.Tensor:
        return tile_max < m + math.log(self.lam)


@registry.selection("recall", granularity="fused", summary="skip tiles while recall >= r holds")
@dataclass(frozen=True)
class Recall(TileLoop):
    """Fixed recall (ours): skip tiles, largest pooled score first, while the skipped mass
    stays within (1 - recall) of the running denominator."""

    recall: float = 0.95
    bound: str = "max"
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        check_fraction(self.recall, "recall")
        if self.bound not in ("max", "exact"):
            raise ValueError(f"bound must be 'max' or 'exact', got {self.bound!r}")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def order(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        scores = pooled_logits(q, k, scale, self.block_q, self.block_k)
        return scores.argsort(dim=-1, descending=True, stable=True)

    @property
    def exact_mass(self) -> bool:
        return self.bound == "exact"

    def skip(self, tile_max, m, lsum, sigma, bound, remaining) -> torch.Tensor:
        budget = (1.0 - self.recall) / self.recall * lsum - sigma
        return bound <= budget / remaining

    def attend(self, q, k, v, tail, **kwargs: Any) -> FusedResult:
        result = super().attend(q, k, v, tail, **kwargs)
        result.info["target_recall"] = self.recall
        return result

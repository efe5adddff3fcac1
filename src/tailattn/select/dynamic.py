r"""In-loop dynamic skipping: ``blasst`` (fixed threshold) and ``recall`` (fixed recall, ours).

A reference of what a flash-attention kernel does (:mod:`tailattn.kernels.skipping` is the
kernel; both make the same decisions): for every query tile (``block_q`` rows, the rows one
program owns) it walks the key tiles (``block_k`` keys) keeping per row a running max m_i, the
kept mass l_i and an accumulator. A key tile j is either folded in,

    m'_i = max(m_i, t_i),  l_i <- l_i e^{m_i - m'_i} + sum_{k in j} e^{z_ik - m'_i},
    acc_i <- acc_i e^{m_i - m'_i} + sum_{k in j} e^{z_ik - m'_i} v_k,

(z_ik = s q_i . k_k, t_i = max_{k in j} z_ik), or skipped, leaving m, l and acc untouched. The
decision is per (query tile, key tile), as in a kernel, made for all rows at once: a tile is
skipped only when every valid row agrees. Each tile ends with a **fate**: 0 skipped before its
QK (``FATE_UNSEEN``), 1 skipped after its QK, before the V load and P.V (``FATE_NO_PV``),
2 computed (``FATE_COMPUTED``).

* ``blasst`` (BLASST): key tiles in memory order, the first never skipped; QK always computed;
  skip when for every valid row ``t_i < m_i + log(lam)``. Skipped mass is lost. ``lam -> 0``
  never skips (full attention).
* ``recall`` (the fixed-recall dynamic threshold; its method text is not public, this design
  is ours):
  key tiles in descending pooled score ``s qbar . kbar_j + log n_j`` (the query tile's mean
  query against the key tile's mean key), so that the large mass comes first. Each row keeps
  sigma_i, a bound on the mass it has skipped, in the scale of l_i (rescaled by e^{m - m'}
  with l). With R tiles not yet visited (this one included) and c = (1 - r) / r, a tile may
  take the share

      b_i = (c l_i - sigma_i) / R                                                    (1)

  of the remaining budget. Every tile but the first visited is tested twice:

  1. before its QK, with the Cauchy-Schwarz bound q.k <= q.kbar_j + |q| rad_j
     (rad_j = max_{k in j} |k - kbar_j|): the tile's mass is at most
     ``B_ij = n_j exp(s (q_i . kbar_j + |q_i| rad_j) - m_i)``; skip (fate 0) when
     ``B_ij < (1 - SKIP_SAFETY) b_i`` on every valid row, and add B_ij to sigma_i;
  2. after its QK, with the exact mass ``E_ij = sum_{k in j} e^{z_ik - m_i}``: skip the V load
     and P.V (fate 1) when ``E_ij < (1 - SKIP_SAFETY) b_i`` on every valid row, add E_ij to sigma_i;

  otherwise the tile is folded in. Each skip keeps sigma_i < c l_i, and l only grows, so the
  skipped mass S_i <= sigma_i <= c L_i at the end and the recall L_i / (L_i + S_i) >= r holds
  for every query row: a guarantee, not an estimate (proof in docs/skipping.md). ``SKIP_SAFETY``
  keeps it under float32 rounding of the logits. Sharing the budget over the R remaining
  tiles keeps some of it for the many small tiles at the end of the order instead of spending
  it on the first tile that fits. ``r = 1`` computes every tile.

Tails (``+uta``, ``+blocks``, ``+moment``): the skipped tiles (fates 0 and 1) of a query tile
are its dropped key blocks; their pooled tokens join the softmax exactly as for block
selections (:mod:`tailattn.tails.block`), so a skipped tile's mass is no longer lost.

On CUDA the loop runs on the Triton kernel (:mod:`tailattn.kernels.skipping`, same decisions);
this reference runs everywhere else and with ``backend="reference"``.

Info entries (with ``return_info``): ``density`` (fraction of (query, key) pairs whose P.V ran)
and ``qk_density`` (whose QK ran), ``layout`` (the computed tiles as a
:class:`~tailattn.layout.BlockLayout`), ``target_recall`` for ``recall``; per query and per
head: ``recall_bound`` (the loop's own guaranteed lower bound ``l / (l + sigma)``, ``recall``
only) and, on the reference path, ``recall`` (exact kept mass, against exact logits).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._checks import accumulation_dtype, check_fraction, check_positive
from ..contract import FATE_COMPUTED, FATE_NO_PV, FATE_UNSEEN, SKIP_SAFETY, Result
from ..layout import BlockLayout, block_sizes, num_blocks
from ..methods import registry
from ..parts import merge_tokens
from ..reference.full import full_attention
from ..reference.streaming import DEFAULT_CHUNK_BYTES
from ..tails.block import BlockDrop, BlockTail, key_block_sums, to_blocks
from .blocks import check_block_size, pooled_logits


@dataclass(frozen=True)
class KeyTiles:
    """Per key tile j: mean key kbar_j (B, H, Mk, D), radius rad_j = max_{k in j} |k - kbar_j|
    (B, H, Mk) and token count n_j (Mk,), in the keys' dtype."""

    mean: torch.Tensor
    radius: torch.Tensor
    sizes: torch.Tensor


def key_tiles(k: torch.Tensor, block_k: int) -> KeyTiles:
    """Mean and radius of every key tile of (B, H, Nk, D) keys (the ragged last one too)."""
    n_k = k.shape[2]
    blocks = to_blocks(k, block_k)
    sizes = block_sizes(n_k, block_k, k.device).to(k.dtype)
    mean = blocks.sum(dim=3) / sizes.unsqueeze(-1)
    valid = (torch.arange(blocks.shape[2] * block_k, device=k.device) < n_k).view(-1, block_k)
    dist = (blocks - mean.unsqueeze(3)).norm(dim=-1).masked_fill(~valid, 0.0)
    return KeyTiles(mean, dist.amax(dim=-1), sizes)


def prior_bound(
    q_chunk: torch.Tensor,
    q_norm: torch.Tensor,
    tiles: KeyTiles,
    j: torch.Tensor,
    m: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``B_ij = n_j exp(s (q_i . kbar_j + |q_i| rad_j) - m_i)`` >= the mass of key tile j
    (Cauchy-Schwarz), without its QK: q_chunk (B, H, c, bq, D), j (B, H, c) -> (B, H, c, bq)."""
    d = q_chunk.shape[-1]
    kbar = tiles.mean.gather(2, j.unsqueeze(-1).expand(*j.shape, d))
    radius = tiles.radius.gather(2, j)
    dots = torch.matmul(q_chunk, kbar.unsqueeze(-1)).squeeze(-1)
    upper = scale * (dots + q_norm * radius.unsqueeze(-1))
    return tiles.sizes[j].unsqueeze(-1) * torch.exp(upper - m)


@dataclass(frozen=True)
class LoopResult:
    """What the tile loop computed, per query tile (B, H, Mq, ...), queries padded to Mq * bq.

    ``out`` (.., bq, Dv) and ``lse`` (.., bq) of the computed tiles, ``fate`` (.., Mk) int8
    (``FATE_*``), ``skipped`` (.., bq): the bound sigma on the skipped mass, relative to e^lse.
    """

    out: torch.Tensor
    lse: torch.Tensor
    fate: torch.Tensor
    skipped: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """(B, H, Mq, Mk) bool: the tiles whose P.V ran."""
        return self.fate == FATE_COMPUTED


class TileLoop(abc.ABC):
    """Base of the loop selections: the flash-attention walk with a skip rule."""

    block_q: int
    block_k: int
    tests_before_qk: ClassVar[bool] = False
    """Whether the rule tests a tile before its QK (then :meth:`skip_unseen` is called)."""

    @abc.abstractmethod
    def order(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Visiting order of the key tiles per query tile, (B, H, Mq, Mk) int64."""

    def skip_unseen(
        self, bound: torch.Tensor, lsum: torch.Tensor, sigma: torch.Tensor, remaining: int
    ) -> torch.Tensor:
        """Per-row wish (B, H, c, bq) to skip a tile before its QK, from a bound of its mass."""
        return torch.zeros_like(bound, dtype=torch.bool)

    @abc.abstractmethod
    def skip_seen(
        self,
        tile_max: torch.Tensor,
        mass: torch.Tensor,
        m: torch.Tensor,
        lsum: torch.Tensor,
        sigma: torch.Tensor,
        remaining: int,
    ) -> torch.Tensor:
        """Per-row wish (B, H, c, bq) to skip a tile after its QK (tile max and exact mass in
        the scale of m known); the tile is skipped when all valid rows agree."""

    def walk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> LoopResult:
        """The loop over key tiles for every query tile (module docstring)."""
        b, h, n_q, d = q.shape
        n_k, dv = k.shape[2], v.shape[-1]
        bq, bk = self.block_q, self.block_k
        mq, mk = num_blocks(n_q, bq), num_blocks(n_k, bk)
        order = self.order(q, k, scale)
        tiles = key_tiles(k, bk) if self.tests_before_qk else None
        q_blocks, k_blocks, v_blocks = to_blocks(q, bq), to_blocks(k, bk), to_blocks(v, bk)
        row_valid = (torch.arange(mq * bq, device=q.device) < n_q).view(mq, bq)
        out = q.new_empty(b, h, mq, bq, dv)
        lse = q.new_empty(b, h, mq, bq)
        fate = torch.empty(b, h, mq, mk, dtype=torch.int8, device=q.device)
        skipped = q.new_empty(b, h, mq, bq)
        per_block = b * h * bq * (bk * 3 + d + dv) * q.element_size()
        step = max(1, DEFAULT_CHUNK_BYTES // per_block)
        for start in range(0, mq, step):
            rows = slice(start, min(start + step, mq))
            chunk = self._walk_chunk(
                q_blocks[:, :, rows], row_valid[rows], order[:, :, rows], k_blocks, v_blocks,
                tiles, n_k, scale,
            )  # fmt: skip
            out[:, :, rows], lse[:, :, rows] = chunk.out, chunk.lse
            fate[:, :, rows], skipped[:, :, rows] = chunk.fate, chunk.skipped
        return LoopResult(out, lse, fate, skipped)

    def _walk_chunk(
        self,
        qc: torch.Tensor,
        row_valid: torch.Tensor,
        order: torch.Tensor,
        k_blocks: torch.Tensor,
        v_blocks: torch.Tensor,
        tiles: KeyTiles | None,
        n_k: int,
        scale: float,
    ) -> LoopResult:
        """The walk of a chunk of c query tiles qc (B, H, c, bq, D), one visit at a time."""
        b, h, c, bq, d = qc.shape
        mk, bk, dv = k_blocks.shape[2], k_blocks.shape[3], v_blocks.shape[-1]
        key_valid = (torch.arange(mk * bk, device=qc.device) < n_k).view(mk, bk)
        q_norm = qc.norm(dim=-1)
        m = qc.new_full((b, h, c, bq), float("-inf"))
        lsum, sigma = qc.new_zeros(b, h, c, bq), qc.new_zeros(b, h, c, bq)
        acc = qc.new_zeros(b, h, c, bq, dv)
        fate = torch.empty(b, h, c, mk, dtype=torch.int8, device=qc.device)
        nobody = torch.zeros(b, h, c, dtype=torch.bool, device=qc.device)

        def everyone(wish: torch.Tensor) -> torch.Tensor:
            return (wish | ~row_valid).all(dim=-1)

        for visit in range(mk):
            j = order[..., visit]  # (B, H, c)
            kt = k_blocks.gather(2, j[..., None, None].expand(b, h, c, bk, d))
            vt = v_blocks.gather(2, j[..., None, None].expand(b, h, c, bk, dv))
            z = scale * qc @ kt.mT
            z = z.masked_fill(~key_valid[j].unsqueeze(-2), float("-inf"))
            tile_max = z.amax(dim=-1)
            new_m = torch.maximum(m, tile_max)
            p = torch.exp(z - new_m.unsqueeze(-1))
            mass = p.sum(dim=-1) * torch.exp(new_m - m)  # the tile's mass in the scale of m
            remaining = mk - visit
            unseen, bound = nobody, mass
            if visit and tiles is not None:
                bound = prior_bound(qc, q_norm, tiles, j, m, scale)
                unseen = everyone(self.skip_unseen(bound, lsum, sigma, remaining))
            seen = nobody
            if visit:
                wish = self.skip_seen(tile_max, mass, m, lsum, sigma, remaining)
                seen = ~unseen & everyone(wish)
            keep = ~(unseen | seen).unsqueeze(-1)
            alpha = torch.exp(m - new_m)
            lsum = torch.where(keep, lsum * alpha + p.sum(dim=-1), lsum)
            acc = torch.where(keep.unsqueeze(-1), acc * alpha.unsqueeze(-1) + p @ vt, acc)
            dropped = torch.where(unseen.unsqueeze(-1), bound, mass)
            sigma = torch.where(keep, sigma * alpha, sigma + dropped)
            m = torch.where(keep, new_m, m)
            code = torch.where(unseen, FATE_UNSEEN, torch.where(seen, FATE_NO_PV, FATE_COMPUTED))
            fate.scatter_(-1, j.unsqueeze(-1), code.to(torch.int8).unsqueeze(-1))
        return LoopResult(acc / lsum.unsqueeze(-1), m + torch.log(lsum), fate, sigma / lsum)

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

    @abc.abstractmethod
    def rule(self) -> Any:
        """The skip rule of the Triton kernel (:mod:`tailattn.kernels.skipping`)."""

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
    ) -> Result:
        """The loop on the Triton kernel (CUDA; ``tail.kernel`` inside it, then
        ``tail.epilogue``) or in the PyTorch reference (any device, with the exact
        statistics)."""
        from ..execute import check_values, choose_kernel, tail_unsupported

        def unsupported() -> str | None:
            from ..kernels.skipping import unsupported_reason

            reason = tail_unsupported(tail)
            return reason or unsupported_reason(q, v, tail.kernel, self.block_q, self.block_k)

        if choose_kernel(backend, (q, k, v), unsupported):
            return self._attend_kernel(q, k, v, tail, scale, with_stats)
        check_values(q, k, v)
        return self._attend_reference(q, k, v, tail, scale, with_stats)

    def _attend_kernel(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tail: BlockTail,
        scale: float,
        with_stats: bool,
    ) -> Result:
        from ..kernels.skipping import skipping_attention

        result = skipping_attention(
            q,
            k,
            v,
            self.rule(),
            tail=tail.kernel,
            scale=scale,
            block_q=self.block_q,
            block_k=self.block_k,
        )
        layout = result.layout()
        out, lse = tail.epilogue(q, k, v, layout, result.out, result.lse, scale)
        if not with_stats:
            return Result(out, lse)
        sizes = block_sizes(q.shape[2], self.block_q, q.device).to(torch.float32)

        def weighted(per_tile: torch.Tensor) -> float:
            """Mean over queries of a per-query-tile fraction (B, H, Mq)."""
            return float((per_tile @ sizes).mean() / sizes.sum())

        info: dict[str, Any] = {
            "density": weighted(result.density),
            "qk_density": weighted(result.qk_density),
            "layout": layout,
        }
        stats = {}
        if result.skipped_ratio is not None:
            stats["recall_bound"] = 1.0 / (1.0 + result.skipped_ratio)
        return Result(out, lse, stats, info)

    def _attend_reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tail: BlockTail,
        scale: float,
        with_stats: bool,
    ) -> Result:
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

        if not with_stats:
            return Result(flat(out), flat(lse))
        layout = BlockLayout.from_dense(loop.kept, n_q, n_k, self.block_q, self.block_k)
        seen = BlockLayout.from_dense(
            loop.fate != FATE_UNSEEN, n_q, n_k, self.block_q, self.block_k
        )
        kept_keys = loop.kept.to(acc) @ block_sizes(n_k, self.block_k, q.device).to(acc)
        density = (kept_keys / n_k).unsqueeze(-1).expand(b, h, -1, self.block_q)
        info: dict[str, Any] = {
            "density": layout.density(),
            "qk_density": seen.density(),
            "layout": layout,
        }
        full_lse = full_attention(qa, ka, va, scale, return_lse=True)[1]
        stats = {
            "density": flat(density),
            "recall": torch.exp(flat(loop.lse) - full_lse),
            "recall_bound": 1.0 / (1.0 + flat(loop.skipped)),
        }
        return Result(flat(out), flat(lse), stats, info)


@registry.selection("blasst", granularity="fused", summary="skip key tiles below max + log lam")
@dataclass(frozen=True)
class Blasst(TileLoop):
    """BLASST: skip a key tile when its max logit is below the running max + log(lam)."""

    lam: float = 1e-3
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        check_positive(self.lam, "lam")
        if not self.lam < 1:
            raise ValueError(f"lam must be in (0, 1), got {self.lam}")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def order(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        b, h = q.shape[:2]
        mq, mk = num_blocks(q.shape[2], self.block_q), num_blocks(k.shape[2], self.block_k)
        return torch.arange(mk, device=q.device).expand(b, h, mq, mk)

    def skip_seen(self, tile_max, mass, m, lsum, sigma, remaining) -> torch.Tensor:
        return tile_max < m + math.log(self.lam)

    def rule(self) -> Any:
        from ..kernels.skipping import BlasstRule

        return BlasstRule(self.lam)


@registry.selection("recall", granularity="fused", summary="skip tiles while recall >= r holds")
@dataclass(frozen=True)
class Recall(TileLoop):
    """Fixed recall (ours): visit tiles by pooled score and skip one, before its QK from the
    Cauchy-Schwarz bound or after it from its exact mass, while it fits its share (1) of the
    budget; the recall of every query row stays >= ``recall``."""

    recall: float = 0.95
    block_q: int = 128
    block_k: int = 128
    tests_before_qk: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_fraction(self.recall, "recall")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def order(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        scores = pooled_logits(q, k, scale, self.block_q, self.block_k)
        return scores.argsort(dim=-1, descending=True, stable=True)

    def fits(
        self, mass: torch.Tensor, lsum: torch.Tensor, sigma: torch.Tensor, remaining: int
    ) -> torch.Tensor:
        """``mass < (1 - SKIP_SAFETY) b`` with the share b of Eq. (1)."""
        share = ((1.0 - self.recall) / self.recall * lsum - sigma) / remaining
        return mass < share * (1.0 - SKIP_SAFETY)

    def skip_unseen(self, bound, lsum, sigma, remaining) -> torch.Tensor:
        return self.fits(bound, lsum, sigma, remaining)

    def skip_seen(self, tile_max, mass, m, lsum, sigma, remaining) -> torch.Tensor:
        return self.fits(mass, lsum, sigma, remaining)

    def rule(self) -> Any:
        from ..kernels.skipping import RecallRule

        return RecallRule(self.recall)

    def attend(self, q, k, v, tail, **kwargs: Any) -> Result:
        result = super().attend(q, k, v, tail, **kwargs)
        if result.info:  # asked for statistics
            result.info["target_recall"] = self.recall
        return result

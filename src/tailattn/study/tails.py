r"""Tail estimators evaluated on a chunk's exact logits and a kept mask.

Notation per row: p = softmax(z) (exact), kept set T with recall r = sum_T p_i, dropped set D
with N_d keys, A = sum_T p_i v_i, zbar = mean_D z, vbar = mean_D v, and w = N_d e^{zbar - lse}
the UTA token's mass relative to the exact total (Eq. 13). Dividing numerator and denominator
of Eq. 14 by e^{lse}:

* ``drop``:      O = A / r                                     (Eq. 5)
* ``uta``:       O = (A + w vbar) / (r + w)                    (Eq. 14)
* ``uta-norm``:  O = A / (r + w)                               (Fig. 7 ablation)
* ``moment``:    O = (A + w g (vbar + c / g)) / (r + w g),     g = 1 + sigma^2 / 2,
  sigma^2 = var_D(z), c = cov_D(z, v) (:mod:`tailattn.tails.token`; for block layouts these
  equal the block form s^2 q^T Cov_D(k) q and s C_D^T q exactly).

So A, sum_T v and sum_T z v (one matrix product each, shared by every tail of the mask) and
per-row sums give every single-token tail. For oracle (prefix) masks the per-row sums are
lookups in the chunk's prefix sums. Multi-token tails -- ``bins`` (groups of similar dropped
logits) and the block ``blocks`` tail (one group per dropped key block) -- use the implied
distribution: p~_i = p_i / (r + sum_g w_g) for kept keys and p~_i = w_g / (n_g (r + sum_g w_g))
for a dropped key of group g, so O = p~ V is one product whatever the number of groups. Tails
of any other form (``lowdelta``, later ones) run through the library's
:func:`tailattn.reference.evaluate_chunk` on the same logits and mask.

Total variation to the exact distribution, TV = 1/2 sum_i |p_i - p~_i|: ``drop`` has TV = 1 - r;
a single token has r |1 - 1/(r + w)| on T plus sum_D |p_i - c|, c = p~ of a dropped key, which
for a prefix mask is a binary search in the sorted probabilities. Tests check every path against
:func:`tailattn.attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..reference import evaluate_chunk
from ..tails import (
    UTA,
    Bins,
    BlockDrop,
    BlockMoment,
    BlockUTA,
    Drop,
    Moment,
    PooledBlocks,
    UTANorm,
)
from .chunk import Chunk, take
from .selections import Kept

Groups = Callable[[Chunk, Kept], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class TailResult:
    """Per-row results of one (method, keep) on a chunk: output (Cq, Dv), total variation
    (Cq,), tail tokens (Cq,), and the implied distribution (Cq, N) when it was asked for."""

    out: torch.Tensor
    tv: torch.Tensor
    tokens: torch.Tensor
    implied: torch.Tensor | None = None


class MaskStats:
    """Sums over the kept set of one mask, computed on first use and shared by its tails."""

    def __init__(self, chunk: Chunk, kept: Kept) -> None:
        self.chunk, self.kept = chunk, kept

    @cached_property
    def weight(self) -> torch.Tensor:
        return self.kept.mask.to(self.chunk.z.dtype)

    def _row_sum(self, prefix: Callable[[], torch.Tensor], values: Callable[[], torch.Tensor]):
        if self.kept.counts is not None:
            return take(prefix(), self.kept.counts)
        return (values() * self.weight).sum(dim=-1)

    @cached_property
    def n_kept(self) -> torch.Tensor:
        if self.kept.counts is not None:
            return self.kept.counts.to(self.chunk.z.dtype)
        return self.weight.sum(dim=-1)

    @cached_property
    def recall(self) -> torch.Tensor:
        return self._row_sum(lambda: self.chunk.p_prefix, lambda: self.chunk.p)

    @cached_property
    def z_kept(self) -> torch.Tensor:
        return self._row_sum(lambda: self.chunk.z_prefix, lambda: self.chunk.z)

    @cached_property
    def z2_kept(self) -> torch.Tensor:
        return self._row_sum(lambda: self.chunk.z2_prefix, lambda: self.chunk.z**2)

    @cached_property
    def pv_kept(self) -> torch.Tensor:
        """A = sum_T p_i v_i, (Cq, Dv)."""
        return (self.chunk.p * self.weight) @ self.chunk.v

    @cached_property
    def v_kept(self) -> torch.Tensor:
        return self.weight @ self.chunk.v

    @cached_property
    def zv_kept(self) -> torch.Tensor:
        return (self.chunk.z * self.weight) @ self.chunk.v

    def dropped_abs_sum(self, c: torch.Tensor) -> torch.Tensor:
        """sum_D |p_i - c| per row, c (Cq,)."""
        chunk = self.chunk
        if self.kept.counts is None:
            diff = (chunk.p - c.unsqueeze(-1)).abs()
            return diff.masked_fill(self.kept.mask, 0.0).sum(dim=-1)
        k, n = self.kept.counts, chunk.n
        above = torch.searchsorted(chunk.p_sorted_negated, -c.unsqueeze(-1)).squeeze(-1)
        split = torch.maximum(above, k)
        prefix = chunk.p_prefix
        mass_hi = take(prefix, split) - take(prefix, k)
        mass_lo = prefix[:, -1] - take(prefix, split)
        return (mass_hi - c * (split - k)) + (c * (n - split) - mass_lo)


def single_token(stats: MaskStats, kind: str, want_implied: bool) -> TailResult:
    """``drop``, ``uta``, ``uta-norm`` or ``moment`` from the mask's sums (module docstring)."""
    chunk = stats.chunk
    r, a = stats.recall, stats.pv_kept
    if kind == "drop":
        out = a / r.unsqueeze(-1)
        implied = chunk.p * stats.weight / r.unsqueeze(-1) if want_implied else None
        return TailResult(out, 1.0 - r, torch.zeros_like(r), implied)
    n_d = chunk.n - stats.n_kept
    has_tail = n_d > 0
    safe = n_d.clamp_min(1.0)
    zbar = (chunk.z_total - stats.z_kept) / safe
    vbar = (chunk.v_total - stats.v_kept) / safe.unsqueeze(-1)
    w = torch.where(has_tail, torch.exp(zbar + torch.log(safe) - chunk.lse), 0.0)
    value = vbar
    if kind == "moment":
        z2 = (chunk.z2_total - stats.z2_kept) / safe
        gain = 1.0 + 0.5 * (z2 - zbar**2).clamp_min(0.0)
        zv = (chunk.zv_total - stats.zv_kept) / safe.unsqueeze(-1)
        w = w * gain
        value = vbar + (zv - zbar.unsqueeze(-1) * vbar) / gain.unsqueeze(-1)
    total = r + w
    numerator = a if kind == "uta-norm" else a + w.unsqueeze(-1) * value
    out = numerator / total.unsqueeze(-1)
    c = w / safe / total
    tv = 0.5 * (r * (1.0 - 1.0 / total).abs() + stats.dropped_abs_sum(c))
    implied = None
    if want_implied:
        implied = torch.where(stats.kept.mask, chunk.p / total.unsqueeze(-1), c.unsqueeze(-1))
    return TailResult(out, tv, has_tail.to(r.dtype), implied)


def group_tail(stats: MaskStats, groups: tuple[torch.Tensor, int]) -> TailResult:
    """One token per group of dropped keys (``groups``: group id (Cq, N) and group count)."""
    chunk, kept = stats.chunk, stats.kept.mask
    z = chunk.z
    group, n_groups = groups
    weight = (~kept).to(z.dtype)
    count = z.new_zeros(z.shape[0], n_groups).scatter_add_(-1, group, weight)
    total = z.new_zeros(z.shape[0], n_groups).scatter_add_(-1, group, z * weight)
    zbar = total / count.clamp_min(1.0)
    mass = torch.where(count > 0, torch.exp(zbar - chunk.lse.unsqueeze(-1)), 0.0)  # per key
    norm = stats.recall + (mass * count).sum(dim=-1)
    implied = torch.where(kept, chunk.p, mass.gather(-1, group)) / norm.unsqueeze(-1)
    out = implied @ chunk.v
    tv = 0.5 * (chunk.p - implied).abs().sum(dim=-1)
    return TailResult(out, tv, (count > 0).sum(dim=-1).to(z.dtype), implied)


def bin_groups(n: int, mode: str) -> Groups:
    """Bins of :class:`tailattn.tails.Bins`: ``count`` splits the sorted dropped logits of a
    prefix mask into n runs of (nearly) equal count; ``width`` splits [min_D z, max_D z] into n
    equal intervals."""

    def groups(chunk: Chunk, kept: Kept) -> tuple[torch.Tensor, int]:
        z = chunk.z
        if mode == "width":
            lo = z.masked_fill(kept.mask, float("inf")).amin(dim=-1, keepdim=True)
            hi = z.masked_fill(kept.mask, float("-inf")).amax(dim=-1, keepdim=True)
            width = (hi - lo).clamp_min(torch.finfo(z.dtype).tiny)
            ids = ((hi - z) / width * n).floor().clamp(0, n - 1)
            return torch.where(kept.mask, 0, ids).long(), n
        assert kept.counts is not None
        k = kept.counts.unsqueeze(-1)
        n_d = chunk.n - k
        b = torch.arange(1, n, device=z.device)
        starts = k + (b * n_d + n - 1) // n  # first sorted position of bins 1..n-1
        edges = chunk.z_sorted.gather(-1, starts.clamp(max=chunk.n - 1))  # descending
        edges = edges.masked_fill(starts >= chunk.n, float("-inf"))  # empty trailing bins
        ascending = edges.flip(-1).contiguous()
        below = torch.searchsorted(ascending, z.contiguous(), right=False)
        ids = (n - 1) - below  # number of bin starts >= z
        return torch.where(kept.mask, 0, ids.clamp(0, n - 1)).long(), n

    return groups


@dataclass(frozen=True)
class TailEval:
    """Evaluates one tail on (mask stats): single token, groups, or the library fallback."""

    kind: str
    groups: Groups | None = None
    fallback: Any = None

    def __call__(self, stats: MaskStats, want_implied: bool = False) -> TailResult:
        prefix_only = self.kind == "bins-count" and stats.kept.counts is None
        if self.groups is not None and not prefix_only:
            return group_tail(stats, self.groups(stats.chunk, stats.kept))
        if self.fallback is None:
            return single_token(stats, self.kind, want_implied)
        chunk, mask = stats.chunk, stats.kept.mask
        res = evaluate_chunk(chunk.z, chunk.v, lambda _: mask, self.fallback, with_stats=True)
        tokens = res.stats["budget"] * chunk.n - stats.n_kept
        return TailResult(res.out, res.stats["implied_tv"], tokens)


def token_tail(tail: Any) -> TailEval:
    """The evaluator of a registry token tail object."""
    if isinstance(tail, Drop):
        return TailEval("drop")
    if isinstance(tail, UTA):
        return TailEval("uta")
    if isinstance(tail, UTANorm):
        return TailEval("uta-norm")
    if isinstance(tail, Moment):
        return TailEval("moment")
    if isinstance(tail, Bins):
        return TailEval(f"bins-{tail.mode}", groups=bin_groups(tail.n, tail.mode), fallback=tail)
    return TailEval("other", fallback=tail)


def block_tail(tail: Any, key_groups: Groups) -> TailEval:
    """The evaluator of a registry block tail object, on the token mask of a block layout.

    ``uta`` and ``moment`` from block sums equal their token forms on the same dropped set
    (s q.kbar_D = mean_D z); ``blocks`` is one group per dropped key block.
    """
    if isinstance(tail, BlockDrop):
        return TailEval("drop")
    if isinstance(tail, BlockUTA):
        return TailEval("uta")
    if isinstance(tail, BlockMoment):
        return TailEval("moment")
    if isinstance(tail, PooledBlocks):
        return TailEval("blocks", groups=key_groups)
    raise ValueError(f"block tail {type(tail).__name__} is not supported by the study")

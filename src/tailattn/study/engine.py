r"""Evaluate one unit (one head's q, k, v): one pass over exact-logit chunks for every pair.

Per unit: sample the query rows, build every selection once (token selections from the shared
sort, block layouts from all of q and k), then for each chunk of rows compute z = s q K^T once
and evaluate every (method, keep) pair on it (:mod:`.tails`). Per pair and row:

* ``mse`` = mean_c (o_c - o*_c)^2, ``rel_l2`` = ||o - o*|| / ||o*||;
* ``recall`` = sum_{i in T} p_i (exact kept mass); ``recall_implied`` = 1 - TV(p, p~) =
  sum_i min(p_i, p~_i), the share of the exact distribution the method's implied one covers
  (equal to ``recall`` for ``drop``; with a tail it also counts the mass the tail restores);
* ``density`` = |T| / N, ``budget`` = (|T| + tail tokens) / N.

The unit's means are over the evaluated rows: with sampled rows (uniform, without replacement)
they are unbiased estimates of the means over all rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..methods import Granularity
from .anatomy import AnatomyAccumulator, log_p_histogram
from .chunk import Chunk
from .fused import fused_job
from .plan import MethodInfo, Pair
from .selections import BlockMask, Kept, TokenMask
from .tails import MaskStats, TailEval, block_tail, token_tail

METRICS = ("mse", "rel_l2", "recall", "recall_implied", "density", "budget")
OUTPUT_ROWS = 32
"""Rows of every unit whose outputs are kept for the output-distribution plot (Fig. 8a)."""
HISTOGRAM_ROWS = 256
"""Rows of every unit whose probabilities go into the density histograms (Fig. 5)."""


@dataclass
class PairStats:
    """Sums over rows of the :data:`METRICS` of one pair."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    rows: int = 0

    def means(self) -> dict[str, float]:
        return {name: value / self.rows for name, value in self.sums.items()}


@dataclass
class UnitResult:
    """Everything measured on one unit (one head of one entry)."""

    label: str
    head: int
    layer: int | None
    step: int | None
    timestep: float | None
    rows: int
    tokens: int
    pairs: dict[Pair, dict[str, float]]
    anatomy: dict[str, float] = field(default_factory=dict)
    recall_curve: list[float] = field(default_factory=list)
    histograms: dict[str, list[float]] = field(default_factory=dict)
    samples: list[list[float]] = field(default_factory=list)
    outputs: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[Pair, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One selection at one keep and the pairs (tails) that share its mask."""

    mask: Callable[[Chunk], Kept]
    tails: list[tuple[Pair, TailEval]]


def sample_rows(n: int, queries: int | None, seed: int) -> torch.Tensor:
    """All rows, or ``queries`` of them uniformly without replacement (sorted), seeded."""
    if queries is None or queries >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:queries].sort().values


def build_jobs(
    pairs: Sequence[Pair],
    methods: dict[str, MethodInfo],
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    grid: tuple[int, int, int] | None,
    v: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[list[Job], dict[Pair, str]]:
    """Group pairs by (selection, keep); block layouts are built here, once per group.

    A selection that cannot run on this source (e.g. a grid-based mask with text tokens) skips
    its pairs with the reason. Fused selections (``blasst``, ``recall``, ``rectified``) need
    ``v`` and the sampled ``rows`` (:mod:`.fused`). A selection whose state follows diffusion
    steps (``steps_state``: DFSAttn's mask cache) gets none: one call is one fresh selection.
    """
    groups: dict[tuple[str, float | None], list[Pair]] = {}
    for pair in pairs:
        groups.setdefault((methods[pair.spec].selection, pair.keep), []).append(pair)
    jobs, skipped = [], {}
    states: dict[str, object] = {}
    for (selection, keep), members in groups.items():
        bound = {p: methods[p.spec].at(keep) for p in members}
        first = bound[members[0]]
        sel = first.selection
        if first.granularity is Granularity.TOKEN:
            jobs.append(Job(TokenMask(sel), [(p, token_tail(bound[p].tail)) for p in members]))
            continue
        if first.granularity is Granularity.FUSED:
            named = [(p, bound[p].tail) for p in members]
            try:
                mask, tails = fused_job(sel, named, (q, k, v), scale, grid, rows)
            except ValueError as err:
                skipped.update({p: str(err) for p in members})
                continue
            jobs.append(Job(mask, tails))
            continue
        wants_state = first.stateful and not getattr(sel, "steps_state", False)
        if selection not in states and wants_state:
            states[selection] = first.new_state()
        try:
            layout = sel(q, k, scale=scale, grid=grid, state=states.get(selection))
        except ValueError as err:
            skipped.update({p: str(err) for p in members})
            continue
        mask = BlockMask.from_layout(layout)
        tails = [(p, block_tail(bound[p].tail, mask.key_groups)) for p in members]
        jobs.append(Job(mask, tails))
    return jobs, skipped


def _chunk_rows(n_keys: int, chunk_bytes: int, itemsize: int) -> int:
    return max(1, chunk_bytes // (n_keys * itemsize))


def evaluate_unit(
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pairs: Sequence[Pair],
    methods: dict[str, MethodInfo],
    *,
    rows: torch.Tensor,
    grid: tuple[int, int, int] | None,
    watch: Sequence[Pair] = (),
    anatomy: bool = True,
    dtype: torch.dtype = torch.float64,
    chunk_bytes: int = 32 * 2**20,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[dict[Pair, PairStats], AnatomyAccumulator | None, dict, dict, dict[Pair, str]]:
    """One pass over the chunks of ``rows`` (module docstring).

    Returns per-pair stats, the anatomy accumulator, log-probability histograms of the exact
    and the watched pairs' implied distributions, output samples, and skipped pairs.
    """
    q4, k4, v4 = (x.to(dtype) for x in qkv)
    scale = 1.0 / math.sqrt(q4.shape[-1])
    jobs, skipped = build_jobs(pairs, methods, q4, k4, scale, grid, v4, rows)
    q, k, v = q4[0, 0], k4[0, 0], v4[0, 0]
    stats = {p: PairStats() for job in jobs for p, _ in job.tails}
    acc = AnatomyAccumulator() if anatomy else None
    histograms: dict[str, torch.Tensor] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    watched = set(watch)
    step = _chunk_rows(k.shape[0], chunk_bytes, torch.finfo(dtype).bits // 8)
    n_keys = k.shape[0]

    def keep_hist(name: str, p: torch.Tensor, start: int) -> None:
        if start >= HISTOGRAM_ROWS:
            return
        hist = log_p_histogram(p[: HISTOGRAM_ROWS - start])
        histograms[name] = hist if name not in histograms else histograms[name] + hist

    def keep_outputs(name: str, out: torch.Tensor, start: int) -> None:
        if start < OUTPUT_ROWS:
            outputs.setdefault(name, []).append(out[: OUTPUT_ROWS - start].flatten())

    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        chunk = Chunk(idx, scale * (q[idx] @ k.T), v)
        ref = chunk.reference[0]
        ref_norm = ref.norm(dim=-1).clamp_min(torch.finfo(dtype).tiny)
        if acc is not None:
            acc.add(chunk, HISTOGRAM_ROWS - start, grid)
        if watched:
            if acc is None:
                keep_hist("full", chunk.p, start)
            keep_outputs("full", ref, start)
        for job in jobs:
            kept = MaskStats(chunk, job.mask(chunk))
            n_kept, recall = kept.n_kept, kept.recall
            for pair, tail in job.tails:
                res = tail(kept, want_implied=pair in watched and start < HISTOGRAM_ROWS)
                err = res.out - ref
                row = {
                    "mse": (err * err).mean(dim=-1),
                    "rel_l2": err.norm(dim=-1) / ref_norm,
                    "recall": recall,
                    "recall_implied": 1.0 - res.tv,
                    "density": n_kept / n_keys,
                    "budget": (n_kept + res.tokens) / n_keys,
                }
                s = stats[pair]
                for name, value in row.items():
                    s.sums[name] += float(value.sum())
                s.rows += idx.numel()
                if pair in watched:
                    if res.implied is not None:
                        keep_hist(pair.label, res.implied, start)
                    keep_outputs(pair.label, res.out, start)
        if on_chunk is not None:
            on_chunk(idx.numel())
    hists = {name: h.tolist() for name, h in histograms.items()}
    outs = {name: torch.cat(parts).tolist() for name, parts in outputs.items()}
    return stats, acc, hists, outs, skipped

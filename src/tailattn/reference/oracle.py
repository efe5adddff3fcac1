"""Oracle sparse attention: exact kept keys plus a tail estimator, streamed over query chunks.

For each chunk of queries the exact logits z (B, H, Cq, Nk) are computed once; the selection
marks the kept set T, the tail estimator turns the dropped set D into tokens, and the two merge
by log-sum-exp (Eq. 14):

    O = (sum_T e^{z_i} v_i + sum_t e^{z_t} v_t) / (sum_T e^{z_i} + sum_t e^{z_t}).

:func:`evaluate_chunk` is the unit the study reuses: one logits chunk, any number of methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import metrics
from .._checks import accumulation_dtype
from ..parts import merge_tokens, softmax_part
from ..tails.token import TailTokens
from .streaming import DEFAULT_CHUNK_BYTES, iter_logits

Selection = Callable[[torch.Tensor], torch.Tensor]
Tail = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], TailTokens]

STAT_NAMES = ("density", "budget", "recall", "tail_mass_error", "implied_tv")
"""Per-query statistics: kept fraction, (kept + tail tokens) / Nk, exact kept mass, relative
error of the represented tail mass, total variation to the implied distribution."""


@dataclass(frozen=True)
class ChunkResult:
    """One chunk's output (B, H, Cq, Dv), lse (B, H, Cq), and per-query stats (B, H, Cq)."""

    out: torch.Tensor
    lse: torch.Tensor
    stats: dict[str, torch.Tensor]


def evaluate_chunk(
    z: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    tail: Tail,
    *,
    with_stats: bool = True,
) -> ChunkResult:
    """Run one selection + tail on a chunk of exact logits.

    Args:
        z: (B, H, Cq, Nk) logits in the accumulation dtype.
        v: (B, H, Nk, Dv) values in the same dtype.
        selection: maps z to the kept mask (B, H, Cq, Nk).
        tail: maps (z, kept, v) to the tail tokens.
        with_stats: compute the per-query statistics of :data:`STAT_NAMES`.
    """
    kept = selection(z)
    out_kept, lse_kept = softmax_part(z, v, kept)
    tokens = tail(z, kept, v)
    out, lse = merge_tokens(out_kept, lse_kept, tokens.logits, tokens.values)
    stats: dict[str, torch.Tensor] = {}
    if with_stats:
        n_keys = z.shape[-1]
        n_kept = kept.sum(dim=-1).to(z.dtype)
        stats = {
            "density": n_kept / n_keys,
            "budget": (n_kept + tokens.tokens) / n_keys,
            "recall": metrics.recall(z, kept),
            "tail_mass_error": metrics.tail_mass_error(z, kept, tokens.logits),
            "implied_tv": metrics.implied_tv(z, kept, tokens.implied, lse),
        }
    return ChunkResult(out, lse, stats)


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    tail: Tail,
    scale: float,
    *,
    with_stats: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Oracle attention over validated (B, H, N, D) inputs.

    Returns:
        out (B, H, Nq, Dv) and lse (B, H, Nq) in the accumulation dtype (float32, or float64
        for float64 inputs), and the per-query stats (B, H, Nq) when ``with_stats``.
    """
    acc = accumulation_dtype(q.dtype)
    v_acc = v.to(acc)
    shape = q.shape[:3]
    out = torch.empty((*shape, v.shape[-1]), dtype=acc, device=q.device)
    lse = torch.empty(shape, dtype=acc, device=q.device)
    stats = {name: torch.empty(shape, dtype=acc, device=q.device) for name in STAT_NAMES}
    for sl, z in iter_logits(q, k, scale, acc, chunk_bytes):
        res = evaluate_chunk(z, v_acc, selection, tail, with_stats=with_stats)
        out[:, :, sl], lse[:, :, sl] = res.out, res.lse
        for name, value in res.stats.items():
            stats[name][:, :, sl] = value
    return out, lse, stats if with_stats else {}

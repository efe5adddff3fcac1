"""Query-chunk streaming: exact logits for a few query rows at a time, never N x N at once."""

from __future__ import annotations

from collections.abc import Iterator

import torch

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Bytes of one logits chunk (B, H, Cq, Nk); the working set is a small multiple of it."""


def chunk_rows(batch_heads: int, n_keys: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Query rows per chunk so that a (B*H, rows, Nk) logits block fits in ``chunk_bytes``."""
    per_row = batch_heads * n_keys * torch.finfo(dtype).bits // 8
    return max(1, chunk_bytes // per_row)


def iter_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    acc: torch.dtype,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    rows: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(query slice, logits)`` with logits (B, H, Cq, Nk) = scale * q_chunk k^T in ``acc``.

    ``rows`` (optional, int64) restricts the queries to a subset; slices then index into it.
    """
    k_acc = k.to(acc)
    q_sel = q if rows is None else q.index_select(2, rows.to(q.device))
    n_q = q_sel.shape[2]
    step = chunk_rows(q.shape[0] * q.shape[1], k.shape[2], acc, chunk_bytes)
    for start in range(0, n_q, step):
        sl = slice(start, min(start + step, n_q))
        yield sl, torch.matmul(q_sel[:, :, sl].to(acc), k_acc.transpose(-1, -2)) * scale

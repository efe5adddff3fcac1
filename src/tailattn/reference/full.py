"""Exact dense attention, streamed over query chunks."""

from __future__ import annotations

import torch

from .._checks import accumulation_dtype, check_qkv, check_scale
from .streaming import DEFAULT_CHUNK_BYTES, iter_logits


def softmax_part(
    logits: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized attention over a chunk's (optionally masked) logits.

    Computes ``o = sum_i e^{z_i} v_i / sum_i e^{z_i}`` (Eq. 3) with max subtraction, and
    ``lse = log sum_i e^{z_i}``; with ``keep`` the sums run over the kept keys only (Eq. 5).

    Args:
        logits: (B, H, Cq, Nk).
        v: (B, H, Nk, Dv) in the same dtype.
        keep: optional bool mask (B, H, Cq, Nk).

    Returns:
        o (B, H, Cq, Dv) and lse (B, H, Cq); rows with no kept key give o = 0, lse = -inf.
    """
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / denom.clamp_min(torch.finfo(p.dtype).tiny)
    return out, (row_max + torch.log(denom)).squeeze(-1)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    layout: str = "bhnd",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention ``O = softmax(s Q K^T) V`` (Eq. 1), any device.

    Streams over query chunks, so memory is O(chunk * Nk), never O(Nq * Nk). Accumulates in
    float32 (float64 when the inputs are float64).

    Args:
        q: (B, H, Nq, D) (or (B, Nq, H, D) with ``layout="bnhd"``).
        k: (B, H, Nk, D).
        v: (B, H, Nk, Dv).
        scale: logit scale s; default 1/sqrt(D).
        return_lse: also return the log-sum-exp per query, (B, H, Nq), natural log.
        layout: ``"bhnd"`` or ``"bnhd"``; the output uses the same layout.
        chunk_bytes: size of one logits chunk.

    Returns:
        out in the input's layout and dtype, and with ``return_lse`` the lse (B, H, Nq) in the
        accumulation dtype.
    """
    q4, k4, v4 = check_qkv(q, k, v, layout)
    s = check_scale(scale, q4.shape[-1])
    acc = accumulation_dtype(q4.dtype)
    v_acc = v4.to(acc)
    out = torch.empty((*q4.shape[:3], v4.shape[-1]), dtype=acc, device=q4.device)
    lse = torch.empty(q4.shape[:3], dtype=acc, device=q4.device)
    for sl, logits in iter_logits(q4, k4, s, acc, chunk_bytes):
        out[:, :, sl], lse[:, :, sl] = softmax_part(logits, v_acc)
    out = out.to(q4.dtype)
    if layout == "bnhd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out

"""Exact dense attention, streamed over query chunks."""

from __future__ import annotations

import torch

from .._checks import accumulation_dtype, check_qkv, check_scale
from ..parts import softmax_part
from .streaming import DEFAULT_CHUNK_BYTES, iter_logits


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

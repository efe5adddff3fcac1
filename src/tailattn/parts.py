"""Attention parts: a softmax over a chunk of logits, and log-sum-exp merging of parts.

A part is a normalized output ``o`` with its log-sum-exp ``lse`` (the log of the unnormalized
softmax denominator). :func:`softmax_part` makes one from logits; two parts over disjoint key
sets merge exactly as

    lse = logaddexp(lse_a, lse_b),   o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b,

which never adds probabilities computed with different maxima. A tail token (logit z_t, value
v_t) is a part with ``o = v_t`` and ``lse = z_t`` (Eq. 14 of the paper is this merge).
"""

from __future__ import annotations

import torch


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``log sum exp`` over the last axis, ``-inf`` for an empty or all ``-inf`` row, with a
    zero (not NaN) gradient there: ``torch.logsumexp`` of an all ``-inf`` row has a NaN
    gradient, which would reach q through an empty tail token (nothing dropped)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], float("-inf"))
    peak = x.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(x - peak).sum(dim=-1)
    some = total > 0
    return torch.where(
        some, torch.log(torch.where(some, total, 1.0)) + peak.squeeze(-1), -torch.inf
    )


def merge_tokens(
    out: torch.Tensor,
    lse: torch.Tensor,
    token_logits: torch.Tensor,
    token_values: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge T extra tokens into a normalized part.

    Args:
        out: (..., Dv) normalized output of the exactly computed keys.
        lse: (...) its log-sum-exp; ``-inf`` when that part is empty.
        token_logits: (..., T) logits of the extra tokens (``log`` of their mass); ``-inf`` marks
            an empty token.
        token_values: (..., T, Dv) their values, or ``None`` for tokens that join the
            denominator only (value 0, the ``uta-norm`` ablation).

    Returns:
        (out, lse) of the union.
    """
    total = torch.logaddexp(lse, _logsumexp(token_logits))
    # guard: an all-empty union (cannot happen with a selection that keeps >= 1 key) stays finite
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    merged = torch.exp(lse - safe_total).unsqueeze(-1) * out
    if token_values is not None:
        weights = torch.exp(token_logits - safe_total.unsqueeze(-1))
        merged = merged + (weights.unsqueeze(-1) * token_values).sum(dim=-2)
    return merged, total


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

"""Block scoring on the GPU: pooled logits from one pass over q and k, top-k into a layout.

Pooled logits (METHODS.md section 2): with block means qbar_m, kbar_n and block sizes n_n,

    S_mn = s qbar_m . kbar_n + log n_n,

whose softmax over n is the pooled estimate of the block's attention mass. Block top-k keeps the
ceil(keep * Mk) largest per query block; softmax is monotone, so no softmax is needed for it.
"""

from __future__ import annotations

import math

import torch

from ..layout import BlockLayout
from .pooling import block_means


def pooled_logits(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float
) -> torch.Tensor:
    """S (B, H, Mq, Mk) float32 from (B, H, N, D) q and k (block means through Triton)."""
    qbar, _ = block_means(q, block_q)
    kbar, log_count = block_means(k, block_k)
    b, h, m_q, d = qbar.shape
    scores = torch.baddbmm(
        log_count.expand(b * h, m_q, -1),
        qbar.view(b * h, m_q, d),
        kbar.view(b * h, -1, d).transpose(1, 2),
        alpha=scale,
    )
    return scores.view(b, h, m_q, -1)


def topk_layout(
    logits: torch.Tensor, keep: float, n_q: int, n_k: int, block_q: int, block_k: int
) -> BlockLayout:
    """Keep the ceil(keep * Mk) highest-scoring key blocks of every query block."""
    m_k = logits.shape[-1]
    budget = min(m_k, max(1, math.ceil(keep * m_k - 1e-9)))
    idx = logits.topk(budget, dim=-1, sorted=False).indices
    counts = torch.full(logits.shape[:3], budget, dtype=torch.int32, device=logits.device)
    return BlockLayout(idx.to(torch.int32), counts, n_q, n_k, block_q, block_k, check=False)

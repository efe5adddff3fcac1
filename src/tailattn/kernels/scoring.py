"""Block scoring on the GPU: pooled logits from one pass over q and k, top-k into a layout.

Pooled logits (METHODS.md section 2): with block means qbar_m, kbar_n and block sizes n_n,

    S_mn = s qbar_m . kbar_n + log n_n,

whose softmax over n is the pooled estimate of the block's attention mass. Block top-k keeps the
ceil(keep * Mk) largest per query block; softmax is monotone, so no softmax is needed for it.
"""

from __future__ import annotations

import math

import torch

from ..layout import BlockLayout, block_sizes
from .pooling import block_sums


def pooled_logits(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float
) -> torch.Tensor:
    """S (B, H, Mq, Mk) float32 from (B, H, N, D) q and k (block sums through Triton)."""
    q_sizes = block_sizes(q.shape[2], block_q, q.device).to(torch.float32)
    k_sizes = block_sizes(k.shape[2], block_k, k.device).to(torch.float32)
    qbar = block_sums(q, block_q) / q_sizes[:, None]
    kbar = block_sums(k, block_k) / k_sizes[:, None]
    return torch.matmul(qbar, kbar.transpose(-1, -2)) * scale + torch.log(k_sizes)


def topk_layout(
    logits: torch.Tensor, keep: float, n_q: int, n_k: int, block_q: int, block_k: int
) -> BlockLayout:
    """Keep the ceil(keep * Mk) highest-scoring key blocks of every query block."""
    m_k = logits.shape[-1]
    budget = min(m_k, max(1, math.ceil(keep * m_k - 1e-9)))
    idx = logits.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values
    counts = torch.full(logits.shape[:3], budget, dtype=torch.int32, device=logits.device)
    return BlockLayout(idx.to(torch.int32), counts, n_q, n_k, block_q, block_k, check=False)

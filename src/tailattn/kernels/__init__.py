"""Triton kernels: fused block-sparse attention with the tail inside, per-block sums.

Importing this package needs Triton; :func:`tailattn.kernels.available` tells the dispatcher
whether the kernels can run here (CUDA with Triton, or the Triton interpreter on CPU).
"""

from .block_sparse import (
    KERNEL_TAILS,
    block_sparse_attention,
    tailed_block_attention,
    unsupported_reason,
)
from .pooling import block_sums

__all__ = [
    "KERNEL_TAILS",
    "block_sparse_attention",
    "block_sums",
    "tailed_block_attention",
    "unsupported_reason",
]

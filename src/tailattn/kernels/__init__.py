"""Triton kernels: fused block-sparse attention with the tail inside, per-block sums.

Importing this package needs Triton; :func:`tailattn.kernels.unsupported_reason` tells the
dispatcher why given inputs cannot run on the kernel (``None`` when they can).
"""

from .block_sparse import block_sparse_attention, unsupported_reason
from .pooling import block_spread, block_sums

__all__ = [
    "block_sparse_attention",
    "block_spread",
    "block_sums",
    "unsupported_reason",
]

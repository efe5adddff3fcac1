"""Exact executors in PyTorch, any device: the ground truth for every method and kernel.

``full`` (dense attention), ``oracle`` (token selections on exact logits plus a token tail),
``blocks`` (a block layout plus a block tail), ``merge`` (log-sum-exp merging of parts) and
``streaming`` (query chunks, so no N x N matrix is ever materialized).
"""

from .blocks import BLOCK_STAT_NAMES, block_attention
from .full import full_attention, softmax_part
from .merge import merge_tokens
from .oracle import STAT_NAMES, ChunkResult, evaluate_chunk, oracle_attention
from .streaming import iter_logits

__all__ = [
    "BLOCK_STAT_NAMES",
    "STAT_NAMES",
    "ChunkResult",
    "block_attention",
    "evaluate_chunk",
    "full_attention",
    "iter_logits",
    "merge_tokens",
    "oracle_attention",
    "softmax_part",
]

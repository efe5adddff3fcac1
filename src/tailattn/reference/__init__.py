"""Exact executors in PyTorch, any device: the ground truth for every method and kernel.

``full`` (dense attention), ``oracle`` (token selections on exact logits plus a token tail),
``blocks`` (a block layout plus a block tail) and ``streaming`` (query chunks, so no N x N
matrix is ever materialized); ``softmax_part`` and ``merge_tokens`` (log-sum-exp merging of
parts, :mod:`tailattn.parts`) are re-exported here.
"""

from ..parts import merge_tokens, softmax_part
from .blocks import BLOCK_STAT_NAMES, block_attention
from .full import full_attention
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

"""Exact math in PyTorch, any device: the ground truth for every method and kernel."""

from .block_tails import (
    BlockDrop,
    BlockMoment,
    BlockTail,
    BlockUTA,
    ChunkTail,
    DroppedSummary,
    KeyBlockSums,
    PooledBlocks,
    dropped_summary,
    key_block_sums,
)
from .blocks import BLOCK_STAT_NAMES, block_attention
from .full import full_attention, softmax_part
from .merge import merge_tokens
from .oracle import STAT_NAMES, ChunkResult, evaluate_chunk, oracle_attention
from .streaming import iter_logits
from .tails import UTA, Bins, Drop, LowDelta, Moment, TailTokens, UTANorm

__all__ = [
    "BLOCK_STAT_NAMES",
    "STAT_NAMES",
    "UTA",
    "Bins",
    "BlockDrop",
    "BlockMoment",
    "BlockTail",
    "BlockUTA",
    "ChunkResult",
    "ChunkTail",
    "Drop",
    "DroppedSummary",
    "KeyBlockSums",
    "LowDelta",
    "Moment",
    "PooledBlocks",
    "TailTokens",
    "UTANorm",
    "block_attention",
    "dropped_summary",
    "evaluate_chunk",
    "full_attention",
    "iter_logits",
    "key_block_sums",
    "merge_tokens",
    "oracle_attention",
    "softmax_part",
]

"""Tail estimators: what happens to the keys a selection drops.

``token`` tails work on exact logits (oracle selections); ``block`` tails work from per-key-block
sums (block and fused selections) and declare what the fused kernel computes for them.
"""

from .block import (
    BlockDrop,
    BlockMoment,
    BlockUTA,
    ChunkTail,
    DroppedSummary,
    KeyBlockSums,
    PooledBlocks,
    dropped_summary,
    key_block_sums,
)
from .token import UTA, Bins, Drop, LowDelta, Moment, TailTokens, UTANorm

__all__ = [
    "UTA",
    "Bins",
    "BlockDrop",
    "BlockMoment",
    "BlockUTA",
    "ChunkTail",
    "Drop",
    "DroppedSummary",
    "KeyBlockSums",
    "LowDelta",
    "Moment",
    "PooledBlocks",
    "TailTokens",
    "UTANorm",
    "dropped_summary",
    "key_block_sums",
]

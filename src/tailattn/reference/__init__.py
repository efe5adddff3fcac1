"""Exact math in PyTorch, any device: the ground truth for every method and kernel."""

from .full import full_attention, softmax_part
from .merge import merge_tokens
from .oracle import STAT_NAMES, ChunkResult, evaluate_chunk, oracle_attention
from .streaming import iter_logits
from .tails import UTA, Bins, Drop, LowDelta, Moment, TailTokens, UTANorm

__all__ = [
    "STAT_NAMES",
    "UTA",
    "Bins",
    "ChunkResult",
    "Drop",
    "LowDelta",
    "Moment",
    "TailTokens",
    "UTANorm",
    "evaluate_chunk",
    "full_attention",
    "iter_logits",
    "merge_tokens",
    "oracle_attention",
    "softmax_part",
]

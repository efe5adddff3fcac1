"""Selections: which (query, key) pairs are computed exactly."""

from .blocks import BlockTopK, BlockTopP, pool_blocks, pooled_logits, pooled_scores
from .oracle import Full, Threshold, TopK, TopP
from .static import Radial, Window, radial_block_mask, window_block_mask
from .svg2 import SVG2, SVG2State

__all__ = [
    "SVG2",
    "BlockTopK",
    "BlockTopP",
    "Full",
    "Radial",
    "SVG2State",
    "Threshold",
    "TopK",
    "TopP",
    "Window",
    "pool_blocks",
    "pooled_logits",
    "pooled_scores",
    "radial_block_mask",
    "window_block_mask",
]

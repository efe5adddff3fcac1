"""Selections: which (query, key) pairs are computed exactly."""

from .blocks import BlockTopK, BlockTopP, pool_blocks, pooled_logits, pooled_scores
from .dfs import DFS, DFSState, tile_block_scores
from .dynamic import Blasst, Recall
from .error_aware import BlockErr
from .oracle import Full, Threshold, TopK, TopP
from .rectified import Rectified, neighbour_blocks
from .static import Radial, Window, radial_block_mask, window_block_mask
from .svg2 import SVG2, SVG2State

__all__ = [
    "DFS",
    "SVG2",
    "Blasst",
    "BlockErr",
    "BlockTopK",
    "BlockTopP",
    "DFSState",
    "Full",
    "Radial",
    "Recall",
    "Rectified",
    "SVG2State",
    "Threshold",
    "TopK",
    "TopP",
    "Window",
    "neighbour_blocks",
    "pool_blocks",
    "pooled_logits",
    "pooled_scores",
    "radial_block_mask",
    "tile_block_scores",
    "window_block_mask",
]

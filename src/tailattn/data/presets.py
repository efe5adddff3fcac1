"""Shape presets: the attention shapes of the video DiTs the lab measures, in one table.

The study's synthetic data (``synthetic:PRESET``), the kernel and per-call benchmarks
(``tailattn bench --shape PRESET``) and the scripts all read this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A shape preset: latent grid (T, H, W), heads, head dim."""

    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    description: str

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def bhnd(self) -> tuple[int, int, int, int]:
        """(B, H, N, D) of one attention call with batch 1."""
        return 1, self.heads, self.tokens, self.head_dim


PRESETS: dict[str, Preset] = {
    "small": Preset((8, 16, 16), 6, 64, "demo size: 2,048 tokens, one head per archetype"),
    "wan-1.3b-480p": Preset((21, 30, 52), 12, 128, "Wan2.1-T2V-1.3B at 480p: N = 32,760"),
    "wan-14b-720p": Preset((21, 45, 80), 40, 128, "Wan2.1-T2V-14B at 720p: N = 75,600"),
}

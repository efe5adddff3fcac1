"""The result type of ``fused`` selections, which run the attention themselves.

Most selections return a layout and leave the computation to an executor. A ``fused``
selection decides while it computes (``blasst`` and ``recall`` skip key tiles inside the
flash-attention loop; ``rectified`` rescales and compensates the sparse output), so it is
called as ``selection.attend(q, k, v, tail, *, scale, grid, state, with_stats)`` on validated
(B, H, N, D) tensors and returns a :class:`FusedResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class FusedResult:
    """Output (B, H, Nq, Dv) and lse (B, H, Nq) in original token order (accumulation dtype),
    per-query statistics (B, H, Nq) by name (empty unless asked for), and further entries for
    the info dict that :func:`tailattn.attention` returns (``density`` at least)."""

    out: torch.Tensor
    lse: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

"""The method contract: what selections and tails provide, as typing Protocols.

Filled in by the core redesign; :class:`KernelTail` is what a block tail asks of the fused
kernels.
"""

from __future__ import annotations

from enum import Enum


class KernelTail(str, Enum):
    """What the fused Triton kernels compute for a block tail, inside the key loop.

    * ``DROP``: nothing (the kept blocks renormalized).
    * ``UTA``: one token per query from the mean dropped key and value (total minus the kept
      blocks' sums, Eq. 10-13).
    * ``BLOCKS``: one pooled token (s q.kbar_j + log n_j, vbar_j) per dropped key block.
    """

    DROP = "drop"
    UTA = "uta"
    BLOCKS = "blocks"

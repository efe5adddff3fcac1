"""Oracle selections: they see the exact logits of every (query, key) pair.

Each takes a chunk of logits z (..., Cq, Nk) and returns a bool mask of the same shape, True
for the keys computed exactly. Every selection keeps at least one key per query (the largest)
and never counts a key twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_fraction, check_positive
from ..methods import registry


@registry.selection("full", granularity="dense", summary="every key (dense attention)")
@dataclass(frozen=True)
class Full:
    """Every key: exact dense attention."""


@registry.selection("topk", granularity="token", summary="the ceil(keep*N) largest logits")
@dataclass(frozen=True)
class TopK:
    """Per query, the ``ceil(keep * Nk)`` largest logits (the Top-K oracle, Eq. 4)."""

    keep: float

    def __post_init__(self) -> None:
        check_fraction(self.keep, "keep")

    def budget(self, n_keys: int) -> int:
        # the small epsilon keeps keep*N that is integral in exact arithmetic from rounding up
        return min(n_keys, max(1, math.ceil(self.keep * n_keys - 1e-9)))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        idx = z.topk(self.budget(z.shape[-1]), dim=-1, sorted=False).indices
        return torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)


@registry.selection("topp", granularity="token", summary="smallest set with exact mass >= p")
@dataclass(frozen=True)
class TopP:
    """Per query, the smallest set of keys whose exact probability mass reaches ``p``."""

    p: float = 0.9

    def __post_init__(self) -> None:
        check_fraction(self.p, "p")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        probs, order = torch.softmax(z, dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        keep_sorted = mass_before < self.p
        keep_sorted[..., 0] = True
        return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


@registry.selection("threshold", granularity="token", summary="logits >= max + log(lam)")
@dataclass(frozen=True)
class Threshold:
    """Keys whose probability is at least ``lam`` times the row maximum: z >= max z + log lam."""

    lam: float = 1e-3

    def __post_init__(self) -> None:
        check_positive(self.lam, "lam")
        if self.lam > 1:
            raise ValueError(f"lam must be in (0, 1], got {self.lam}")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z >= z.amax(dim=-1, keepdim=True) + math.log(self.lam)

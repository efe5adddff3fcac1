r"""One query chunk's exact logits, shared by every (method, keep) pair of the study.

For sampled query rows of one head, z = s q K^T (Cq, N) is computed once. Derived from it once:
the exact probabilities p = softmax(z), the exact output ``O* = p V`` (Eq. 1-3), the logits
sorted in descending order with the prefix sums of their probabilities and values (so that every
oracle selection is a threshold and every single-token tail an O(1) lookup per row), and the
totals sum_i z_i, sum_i z_i^2, sum_i v_i. Selections turn the chunk into kept masks and tails
into outputs without touching q or k again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..reference import softmax_part

SORT_THREADS = 2


def sort_descending(z: torch.Tensor) -> torch.Tensor:
    """Row-wise descending sort of the values (NumPy, rows split over threads)."""
    x = z.detach().cpu().numpy()
    parts = np.array_split(np.arange(x.shape[0]), min(SORT_THREADS, x.shape[0]))
    with ThreadPoolExecutor(len(parts)) as pool:
        sorted_parts = list(pool.map(lambda rows: np.sort(x[rows], axis=-1), parts))
    return torch.from_numpy(np.concatenate(sorted_parts)[:, ::-1].copy()).to(z.device)


def _padded_cumsum(x: torch.Tensor) -> torch.Tensor:
    """(C, N) -> (C, N + 1) prefix sums with a leading 0: sum of x[a:b] = c[b] - c[a]."""
    return torch.nn.functional.pad(x.cumsum(dim=-1), (1, 0))


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[row, index[row]] for (C, M) x and (C,) index."""
    return x.gather(-1, index.unsqueeze(-1)).squeeze(-1)


@dataclass
class Chunk:
    """Exact quantities of a chunk of query rows of one head.

    Attributes:
        rows: (Cq,) original indices of the query rows.
        z: (Cq, N) exact logits in the study dtype.
        v: (N, Dv) values in the same dtype.
    """

    rows: torch.Tensor
    z: torch.Tensor
    v: torch.Tensor

    @property
    def n(self) -> int:
        return self.z.shape[-1]

    @cached_property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact output (Cq, Dv) and log-sum-exp (Cq,)."""
        return softmax_part(self.z, self.v)

    @property
    def lse(self) -> torch.Tensor:
        return self.reference[1]

    @cached_property
    def p(self) -> torch.Tensor:
        """Exact probabilities (Cq, N)."""
        return torch.exp(self.z - self.lse.unsqueeze(-1))

    @cached_property
    def z_sorted(self) -> torch.Tensor:
        """Logits in descending order (Cq, N)."""
        return sort_descending(self.z)

    @cached_property
    def p_sorted(self) -> torch.Tensor:
        """Exact probabilities in descending order (Cq, N)."""
        return torch.exp(self.z_sorted - self.lse.unsqueeze(-1))

    @cached_property
    def p_sorted_negated(self) -> torch.Tensor:
        """-p in ascending order (Cq, N), for binary searches."""
        return -self.p_sorted

    @cached_property
    def p_prefix(self) -> torch.Tensor:
        """(Cq, N + 1): mass of the c largest probabilities at index c."""
        return _padded_cumsum(self.p_sorted)

    @cached_property
    def z_prefix(self) -> torch.Tensor:
        """(Cq, N + 1): sum of the c largest logits at index c."""
        return _padded_cumsum(self.z_sorted)

    @cached_property
    def z2_prefix(self) -> torch.Tensor:
        """(Cq, N + 1): sum of the squares of the c largest logits at index c."""
        return _padded_cumsum(self.z_sorted * self.z_sorted)

    @cached_property
    def z_total(self) -> torch.Tensor:
        """sum_i z_i per row, (Cq,)."""
        return self.z.sum(dim=-1)

    @cached_property
    def z2_total(self) -> torch.Tensor:
        """sum_i z_i^2 per row, (Cq,)."""
        return (self.z * self.z).sum(dim=-1)

    @cached_property
    def v_total(self) -> torch.Tensor:
        """sum_i v_i, (Dv,)."""
        return self.v.sum(dim=0)

    @cached_property
    def zv_total(self) -> torch.Tensor:
        """sum_i z_i v_i per row, (Cq, Dv)."""
        return self.z @ self.v

    def threshold(self, counts: torch.Tensor) -> torch.Tensor:
        """Logit of rank ``counts - 1`` (the smallest kept of a top-``counts`` prefix), (Cq,)."""
        return take(self.z_sorted, (counts - 1).clamp(0, self.n - 1))

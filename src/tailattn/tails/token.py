r"""Tail estimators on exact logits (oracle granularity).

Per query, logits z_i, kept set T, dropped set D with N_d = |D|. A tail estimator replaces the
dropped keys by a few representative tokens (logit, value) that join the softmax; a token with
logit ``zbar + log n`` stands for n keys of logit ``zbar`` (the ``log n`` restores the count).

* ``drop``: no token (Top-K renormalization, Eq. 5).
* ``uta``: one token, logit ``mean_D(z) + log N_d`` and value ``mean_D(v)`` (Eq. 10-14). Exact
  when all dropped logits are equal (Theorem 3.1).
* ``uta-norm``: the same logit, value 0: the tail joins the denominator only (Fig. 7 ablation).
* ``bins(n, mode)``: D split into n groups of similar logits, one ``uta`` token each. ``count``
  (default): equal counts over the sorted dropped logits; ``width``: equal-width logit intervals.
  One bin equals ``uta``; one bin per dropped key equals exact attention.
* ``lowdelta(delta)``: the Low-Delta oracle (Sec. 3.3): greedy groups over the sorted dropped
  logits, each group's spread (max - min) at most delta; budget |T| + number of groups.
* ``moment``: second-order correction of ``uta`` (ours, beyond the paper), derived below.

``moment`` derivation. Expand e^{z_i} around zbar = mean_D(z), with d_i = z_i - zbar:
``sum_D e^{z_i} = N_d e^{zbar} mean(e^{d}) ~ N_d e^{zbar} (1 + sigma^2 / 2)``,
``sigma^2 = mean_D(d^2)`` (mean(d) = 0, so the first-order term vanishes). For the value sum,
``sum_D e^{z_i} v_i ~ N_d e^{zbar} [vbar (1 + sigma^2/2) + c + O(d^2 (v - vbar))]`` with
``c = mean_D(d_i v_i) = mean_D(d_i (v_i - vbar))``, the logit-value covariance. Dividing,

    tail logit  = zbar + log N_d + log(1 + sigma^2 / 2)
    tail value  = vbar + c / (1 + sigma^2 / 2).

In terms of keys, sigma^2 = s^2 q^T Cov_D(k) q and c = s C_D^T q with
C_D = mean_D((k - kbar)(v - vbar)^T), which is how the block form computes them. With equal
dropped logits sigma = 0 and c = 0, and the token is the ``uta`` token exactly. (The value
(vbar + c)/(1 + sigma^2/2), a tempting shortcut, is not exact for constant values -- all
v_i = v would give v/(1 + sigma^2/2) -- so the consistent expansion above is used.) It is an
experiment: with widely spread tail logits the expansion is poor and can lose to ``uta``.

Every estimator returns a :class:`TailTokens`; shapes below use (..., Cq, Nk) for a chunk of
logits and (..., Nk, Dv) for the values, with the leading axes (B, H).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .._checks import check_positive
from ..methods import registry


@dataclass(frozen=True)
class TailTokens:
    """Representative tokens of one chunk's dropped sets.

    Attributes:
        logits: (..., Cq, T) token logits (log of the mass each stands for); ``-inf`` = empty.
        values: (..., Cq, T, Dv) token values, or ``None`` when the tokens carry no value.
        implied: (..., Cq, Nk) the logit each dropped key implicitly receives (the token's
            logit minus the log of its member count); ``-inf`` where a dropped key gets nothing.
            Kept keys' entries are unspecified.
        tokens: (..., Cq) number of non-empty tokens (the tail's share of the budget).
    """

    logits: torch.Tensor
    values: torch.Tensor | None
    implied: torch.Tensor
    tokens: torch.Tensor


def _empty(z: torch.Tensor) -> TailTokens:
    return TailTokens(
        logits=z.new_full((*z.shape[:-1], 0), float("-inf")),
        values=None,
        implied=torch.full_like(z, float("-inf")),
        tokens=z.new_zeros(z.shape[:-1]),
    )


def _group_tokens(
    z: torch.Tensor, members: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of one group per query: (count, mean logit, mean value, token logit).

    ``members`` (..., Cq, Nk) bool. Empty groups get token logit -inf and value 0.
    """
    w = members.to(z.dtype)
    count = w.sum(dim=-1)
    safe = count.clamp_min(1.0)
    zbar = (z * w).sum(dim=-1) / safe
    vbar = torch.matmul(w, v) / safe.unsqueeze(-1)
    token = torch.where(count > 0, zbar + torch.log(safe), torch.full_like(zbar, float("-inf")))
    return count, zbar, vbar, token


def _from_groups(
    z: torch.Tensor, groups: Iterable[torch.Tensor], v: torch.Tensor, with_values: bool = True
) -> TailTokens:
    """One token per group; ``groups`` yields (..., Cq, Nk) bool member masks, one at a time."""
    logits, values = [], []
    implied = torch.full_like(z, float("-inf"))
    tokens = z.new_zeros(z.shape[:-1])
    for members in groups:
        count, zbar, vbar, token = _group_tokens(z, members, v)
        logits.append(token)
        values.append(vbar)
        implied = torch.where(members, zbar.unsqueeze(-1), implied)
        tokens = tokens + (count > 0).to(z.dtype)
    return TailTokens(
        logits=torch.stack(logits, dim=-1),
        values=torch.stack(values, dim=-2) if with_values else None,
        implied=implied,
        tokens=tokens,
    )


@registry.tail("drop", granularity="token", summary="discard the tail (Top-K renormalization)")
@dataclass(frozen=True)
class Drop:
    """Discard the dropped keys: the kept weights are renormalized (Eq. 5)."""

    def __call__(self, z: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> TailTokens:
        return _empty(z)


@registry.tail("uta", granularity="token", summary="one token: mean logit + log N_d, mean value")
@dataclass(frozen=True)
class UTA:
    """Unified Tail Aggregation: one token (mean_D z + log N_d, mean_D v) (Eq. 10-14)."""

    def __call__(self, z: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> TailTokens:
        return _from_groups(z, [~kept], v)


@registry.tail("uta-norm", granularity="token", summary="uta mass in the denominator, value 0")
@dataclass(frozen=True)
class UTANorm:
    """The UTA token in the denominator only, value 0 (normalization-only ablation, Fig. 7)."""

    def __call__(self, z: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> TailTokens:
        return _from_groups(z, [~kept], v, with_values=False)


@registry.tail("bins", granularity="token", summary="n tokens over groups of similar logits")
@dataclass(frozen=True)
class Bins:
    """n UTA tokens over groups of similar dropped logits (Fig. 4).

    ``mode="count"`` splits the descending-sorted dropped logits into n runs of (nearly) equal
    count; ``mode="width"`` into n equal-width intervals of [min_D z, max_D z].
    """

    n: int = 8
    mode: str = "count"

    def __post_init__(self) -> None:
        check_positive(self.n, "bins n", integer=True)
        if self.n > 64:
            raise ValueError(f"bins n must be at most 64, got {self.n}")
        if self.mode not in ("count", "width"):
            raise ValueError(f"bins mode must be 'count' or 'width', got {self.mode!r}")

    def __call__(self, z: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> TailTokens:
        dropped = ~kept
        n_d = dropped.sum(dim=-1, keepdim=True)
        if self.mode == "count":
            masked = z.masked_fill(kept, float("-inf"))
            order = masked.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(
                -1, order, torch.arange(z.shape[-1], device=z.device).expand_as(order)
            )
            bin_id = rank * self.n // n_d.clamp_min(1)
        else:
            lo = z.masked_fill(kept, float("inf")).amin(dim=-1, keepdim=True)
            hi = z.masked_fill(kept, float("-inf")).amax(dim=-1, keepdim=True)
            width = (hi - lo).clamp_min(torch.finfo(z.dtype).tiny)
            bin_id = ((hi - z) / width * self.n).floor().clamp(0, self.n - 1).long()
        return _from_groups(z, (dropped & (bin_id == b) for b in range(self.n)), v)


@registry.tail("lowdelta", granularity="token", summary="greedy groups of logit spread <= delta")
@dataclass(frozen=True)
class LowDelta:
    """The Low-Delta oracle: greedy groups of dropped logits with spread at most ``delta``.

    Starting from the largest remaining dropped logit m, a group takes every remaining dropped
    key with z >= m - delta; repeat until D is covered. The number of groups is data dependent
    (reported as the tail's share of the budget) and so is the cost: one pass per group.
    """

    delta: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)):
            raise TypeError(f"lowdelta delta must be a number, got {self.delta!r}")
        if not self.delta >= 0:
            raise ValueError(f"lowdelta delta must be >= 0, got {self.delta}")

    def __call__(self, z: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> TailTokens:
        if bool(kept.all()):
            return _empty(z)
        return _from_groups(z, self._groups(z, ~kept), v)

    def _groups(self, z: torch.Tensor, remaining: torch.Tensor) -> Iterator[torch.Tensor]:
        while bool(remaining.any()):
            top = z.masked_fill(~remaining, float("-inf")).amax(dim=-1, keepdim=True)
            members = remaining & (z >= top - self.delta)
            yield members
            remaining = remaining & ~members


@registry.tail("moment", granularity="token", summary="uta with a second-order mass/value fix")
@dataclass(frozen=True)
class Moment:
    """Second-order tail token: logit zbar + log N_d + log(1 + sigma^2/2), value
    vbar + c / (1 + sigma^2/2) (ours; derivation in the module docstring)."""

    def __call__(self, z: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> TailTokens:
        dropped = ~kept
        count, zbar, vbar, token = _group_tokens(z, dropped, v)
        w = dropped.to(z.dtype)
        safe = count.clamp_min(1.0)
        dev = (z - zbar.unsqueeze(-1)) * w
        sigma2 = (dev * dev).sum(dim=-1) / safe
        cov = torch.matmul(dev, v) / safe.unsqueeze(-1)
        gain = 1.0 + 0.5 * sigma2
        logit = token + torch.log(gain)
        value = vbar + cov / gain.unsqueeze(-1)
        implied = torch.where(dropped, (zbar + torch.log(gain)).unsqueeze(-1), float("-inf"))
        return TailTokens(
            logits=logit.unsqueeze(-1),
            values=value.unsqueeze(-2),
            implied=implied,
            tokens=(count > 0).to(z.dtype),
        )

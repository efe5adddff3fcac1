r"""Anatomy of the exact attention rows (UTA paper, Sec. 3.4.1, Fig. 1a and Fig. 3).

Per query row with probabilities sorted in descending order p_(1) >= ... >= p_(N):

* ``top1_mass``, ``top10_mass``: sum of the largest ceil(0.01 N) (ceil(0.1 N)) probabilities:
  how much of the mass a small fraction of keys holds (the skew of Fig. 3a).
* ``lower90_mass``: the mass of the lower 90 % of keys.
* ``lower90_peak``: N p_(ceil(0.1 N) + 1), the largest probability of the lower 90 % in units of
  the uniform 1/N: the lower 90 % lie in [0, peak / N], a narrow band near zero (Fig. 3b, c).
* ``lower90_logit_std``: standard deviation of the logits of the lower 90 %: the spread that
  UTA's single token ignores (Jensen gap e^{sigma^2/2} for Gaussian tails).
* ``delta_zero_share``: share of the adjacent differences p_(i) - p_(i+1) smaller than 1 % of
  the largest one: the sharp peak at zero of Fig. 3d.
* ``local_mass``: the mass of the keys near the query on the (T, H, W) token grid,
  ``|t_k - t_q| <= LOCAL_FRAMES`` and ``max(|h_k - h_q|, |w_k - w_q|) <= LOCAL_RADIUS`` (a
  3 x 7 x 7 neighbourhood, 147 keys in the interior); ``1 - local_mass`` is the long-range
  mass. ``frame_mass``: the mass of the keys in the query's own frame (spatial against temporal
  attention). Tokens past the grid (text) are neither; without a grid both are NaN.
* ``recall_curve``: exact kept mass of the Top-K oracle at each keep of :data:`CURVE_KEEPS`
  (Fig. 1a).

Everything is a mean over the evaluated rows; :class:`AnatomyAccumulator` sums chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .chunk import Chunk

CURVE_KEEPS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, *(i / 20 for i in range(2, 21)))
STAT_NAMES = (
    "top1_mass",
    "top10_mass",
    "lower90_mass",
    "lower90_peak",
    "lower90_logit_std",
    "delta_zero_share",
    "local_mass",
    "frame_mass",
)
LOCAL_FRAMES, LOCAL_RADIUS = 1, 3
LOG_P_RANGE = (-12.0, 0.0)
LOG_P_BINS = 96
SAMPLE_ROWS = 2


def _prefix(n: int, fraction: float) -> int:
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def row_stats(chunk: Chunk) -> dict[str, torch.Tensor]:
    """The per-row statistics of :data:`STAT_NAMES` (each (Cq,))."""
    ps, zs = chunk.p_sorted, chunk.z_sorted
    n = ps.shape[-1]
    cum = ps.cumsum(dim=-1)
    top1, top10 = _prefix(n, 0.01), _prefix(n, 0.1)
    deltas = ps[:, :-1] - ps[:, 1:]
    largest = deltas.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(ps.dtype).tiny)
    return {
        "top1_mass": cum[:, top1 - 1],
        "top10_mass": cum[:, top10 - 1],
        "lower90_mass": 1.0 - cum[:, top10 - 1],
        "lower90_peak": n * ps[:, min(top10, n - 1)],
        "lower90_logit_std": zs[:, top10:].std(dim=-1) if n - top10 > 1 else zs[:, 0] * 0,
        "delta_zero_share": (deltas < 0.01 * largest).to(ps.dtype).mean(dim=-1),
    }


def locality(chunk: Chunk, grid: tuple[int, int, int] | None) -> dict[str, torch.Tensor]:
    """``local_mass`` and ``frame_mass`` of each row (each (Cq,); module docstring)."""
    p = chunk.p
    if grid is None:
        nan = torch.full(p.shape[:1], math.nan, dtype=p.dtype, device=p.device)
        return {"local_mass": nan, "frame_mass": nan}
    t, h, w = grid
    keys = torch.arange(p.shape[-1], device=p.device)
    on_grid = keys < t * h * w

    def coords(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return index // (h * w), (index // w) % h, index % w

    tk, hk, wk = coords(keys)
    tq, hq, wq = (c[:, None] for c in coords(chunk.rows.to(p.device)))
    same_frame = (tk == tq) & on_grid
    near = (hk - hq).abs().maximum((wk - wq).abs()) <= LOCAL_RADIUS
    local = ((tk - tq).abs() <= LOCAL_FRAMES) & near & on_grid
    return {
        "local_mass": (p * local).sum(dim=-1),
        "frame_mass": (p * same_frame).sum(dim=-1),
    }


def recall_curve(chunk: Chunk) -> torch.Tensor:
    """(Cq, len(CURVE_KEEPS)) Top-K recall at each keep of the curve."""
    n = chunk.p_sorted.shape[-1]
    cum = chunk.p_sorted.cumsum(dim=-1)
    index = torch.tensor([_prefix(n, k) - 1 for k in CURVE_KEEPS], device=cum.device)
    return cum[:, index]


def log_p_histogram(p: torch.Tensor) -> torch.Tensor:
    """Counts of log10(p) over :data:`LOG_P_RANGE` in :data:`LOG_P_BINS` bins; p = 0 skipped,
    values below the range go to the first bin."""
    lo, hi = LOG_P_RANGE
    logs = torch.log10(p[p > 0]).clamp(lo, hi).to(torch.float64)
    return torch.histc(logs, bins=LOG_P_BINS, min=lo, max=hi)


@dataclass
class AnatomyAccumulator:
    """Sums of the row statistics, the recall curve and the probability histogram of a head,
    plus a few sorted rows kept whole for the Fig. 3 plots."""

    rows: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    curve: torch.Tensor | None = None
    histogram: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(
        self, chunk: Chunk, histogram_rows: int, grid: tuple[int, int, int] | None = None
    ) -> None:
        """Add a chunk; its first ``histogram_rows`` rows also go into the histogram; ``grid``
        (T, H, W) places the keys for :func:`locality`."""
        for name, value in {**row_stats(chunk), **locality(chunk, grid)}.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.sum())
        curve = recall_curve(chunk).sum(dim=0)
        self.curve = curve if self.curve is None else self.curve + curve
        if histogram_rows > 0:
            hist = log_p_histogram(chunk.p[:histogram_rows])
            self.histogram = hist if self.histogram is None else self.histogram + hist
        for row in chunk.p_sorted[: max(0, SAMPLE_ROWS - len(self.samples))]:
            self.samples.append(row.to(torch.float64).clone())
        self.rows += chunk.z.shape[0]

    def means(self) -> dict[str, float]:
        return {name: total / self.rows for name, total in self.sums.items()}

    def mean_curve(self) -> list[float]:
        assert self.curve is not None
        return (self.curve / self.rows).tolist()

r"""Static block masks from the latent grid: ``radial`` (energy decay) and ``window`` (3D local).

Tokens are in (t, h, w) row-major order over the grid (T, H, W), P = H * W tokens per frame,
and a token's in-frame index is ``s = h * W + w``. A mask is first defined on token pairs; a
block pair is computed when any of its token pairs is kept (so the blocks cover the token mask).
Both masks are the same for every (batch, head) and depend only on pure arguments, so they are
cached with ``functools.lru_cache`` (no other state), and so are their CSR rows on each device:
after the first call a static selection neither builds nor copies anything.

``radial`` (after Radial Attention; the exact constants below are ours). For a query in frame
t_q and a key in frame t_k at distance d = |t_q - t_k|, band g = bit_length(d) (0, 1, 2, 2, 3, 3,
3, 3, 4, ...), and the window radius halves from band to band:

    r(0) = P (whole frame),    r(d) = decay * P / 2^(g - 1)   (d >= 1)

* r(d) >= block_k: keep the key when |s_q - s_k| <= r(d);
* r(d) <  block_k: the band is thinned in time instead: keep it only for frame distances with
  d % ceil(block_k / r(d)) == 0, with a one-block radius |s_q - s_k| <= block_k;
* attention sink: every query keeps the whole first frame (``sink=True``).

Each band doubles in length while its window halves, so a query keeps O(P log T) keys: O(n log n)
in total. ``window``: keep the key when |t_q - t_k| <= t, |h_q - h_k| <= h and |w_q - w_k| <= w.

Budget: with ``keep`` given, the method's own knob is fitted instead of taken from the fields,
by bisection: radial over decay = 2^(j/4) (2^-12 up to dense), window over radii proportional
to the grid (j/64 of each extent). The result has density at most ``keep`` (the densest such
for window, whose masks are nested; radial's temporal thinning is not nested, so its density is
only nearly monotone in decay); when even the sparsest candidate exceeds ``keep`` (radial always
keeps the query's own frame and the sink), that one. The measured density is
``layout.density()``.
Grid-based selections need ``grid=(T, H, W)`` with T * H * W = N and self-attention (Nq = Nk);
text tokens are not supported yet.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_fraction, check_grid, check_positive
from ..layout import BlockLayout, block_sizes, num_blocks
from ..methods import registry
from .blocks import check_block_size

PairRule = Callable[..., torch.Tensor]
PAIR_CHUNK = 1024
"""Query runs evaluated against all key runs at once when building a block mask."""


@dataclass(frozen=True)
class Runs:
    """Maximal token runs inside one block and one period (a frame or a grid row).

    All (S,) int64: the run's block, its period index (``token // period``), and the first and
    last in-period positions (``token % period``) it covers.
    """

    block: torch.Tensor
    period: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def token_runs(n: int, block: int, period: int) -> Runs:
    """Cut 0..n-1 at every block and every period boundary."""
    cuts = torch.cat(
        [torch.arange(0, n, block), torch.arange(0, n, period), torch.tensor([n])]
    ).unique()
    starts, ends = cuts[:-1], cuts[1:] - 1
    return Runs(starts // block, starts // period, starts % period, ends % period)


def runs_block_mask(
    n: int, block_q: int, block_k: int, period: int, rule: PairRule
) -> torch.Tensor:
    """(Mq, Mk) bool: block pair kept when ``rule`` keeps any pair of their runs.

    ``rule(q_period, q_lo, q_hi, k_period, k_lo, k_hi)`` gets broadcastable (c, 1) and (1, S)
    tensors and returns whether some token pair of the two runs is kept.
    """
    qr, kr = token_runs(n, block_q, period), token_runs(n, block_k, period)
    mk = num_blocks(n, block_k)
    mask = torch.zeros(num_blocks(n, block_q), mk, dtype=torch.int64)
    k_cols = [kr.period[None], kr.lo[None], kr.hi[None]]
    for start in range(0, qr.block.numel(), PAIR_CHUNK):
        sl = slice(start, start + PAIR_CHUNK)
        hits = rule(qr.period[sl, None], qr.lo[sl, None], qr.hi[sl, None], *k_cols)
        per_block = torch.zeros(hits.shape[0], mk, dtype=torch.int64)
        per_block.scatter_reduce_(1, kr.block.expand_as(hits), hits.long(), "amax")
        mask.index_add_(0, qr.block[sl], per_block)
    return mask > 0


def gap(
    q_lo: torch.Tensor, q_hi: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor
) -> torch.Tensor:
    """Smallest |a - b| over a in [q_lo, q_hi], b in [k_lo, k_hi]."""
    return (k_lo - q_hi).clamp_min(0) + (q_lo - k_hi).clamp_min(0)


def radial_limits(frames: int, frame: int, block_k: int, decay: float) -> torch.Tensor:
    """Largest kept |s_q - s_k| per frame distance d = 0..frames-1 (-1: band thinned out).

    ``r(d)`` when r(d) >= block_k; otherwise ``block_k`` on every ceil(block_k / r(d))-th
    frame distance and -1 elsewhere (float64, (frames,)).
    """
    limits = []
    for d in range(frames):
        radius = frame if d == 0 else decay * frame / 2 ** (d.bit_length() - 1)
        if radius >= block_k:
            limits.append(radius)
        else:
            stride = math.ceil(block_k / radius) if radius > block_k / frames else frames
            limits.append(float(block_k) if d % stride == 0 else -1.0)
    return torch.tensor(limits, dtype=torch.float64)


def density_of(mask: torch.Tensor, n: int, block_q: int, block_k: int) -> float:
    """Token-level density of a static (Mq, Mk) block mask of a self-attention of n tokens."""
    rows, cols = block_sizes(n, block_q).double(), block_sizes(n, block_k).double()
    return float(rows @ mask.double() @ cols) / (n * n)


def fit_to_keep(
    keep: float,
    build: Callable[[int], torch.Tensor],
    steps: int,
    n: int,
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """Bisection over masks ``build(0..steps)`` of (nearly) non-decreasing density.

    Returns a mask of density <= keep, the last such one the bisection meets (the densest when
    the densities are monotone), or ``build(0)`` when even that one is denser than keep.
    """
    lo, hi = 0, steps
    if density_of(build(hi), n, block_q, block_k) <= keep + 1e-12:
        return build(hi)
    while hi - lo > 1:  # invariant: build(hi) is denser than keep
        mid = (lo + hi) // 2
        if density_of(build(mid), n, block_q, block_k) <= keep + 1e-12:
            lo = mid
        else:
            hi = mid
    return build(lo)


@functools.lru_cache(maxsize=64)
def _radial_mask(
    grid: tuple[int, int, int], block_q: int, block_k: int, decay: float, sink: bool
) -> torch.Tensor:
    t, h, w = grid
    frame = h * w
    limit = radial_limits(t, frame, block_k, decay)

    def rule(tq, q_lo, q_hi, tk, k_lo, k_hi):
        kept = gap(q_lo, q_hi, k_lo, k_hi) <= limit[(tq - tk).abs()]
        return kept | (tk == 0) if sink else kept

    return runs_block_mask(t * h * w, block_q, block_k, frame, rule)


@functools.lru_cache(maxsize=64)
def _radial_fit(
    grid: tuple[int, int, int], block_q: int, block_k: int, keep: float, sink: bool
) -> torch.Tensor:
    steps = 48 + 4 * (max(grid[0], 2).bit_length() + 2)  # decay 2^-12 .. above dense

    def build(j: int) -> torch.Tensor:
        return _radial_mask(grid, block_q, block_k, 2.0 ** ((j - 48) / 4), sink)

    return fit_to_keep(keep, build, steps, math.prod(grid), block_q, block_k)


def radial_block_mask(
    grid: tuple[int, int, int],
    block_q: int = 128,
    block_k: int = 128,
    decay: float = 0.2,
    sink: bool = True,
    keep: float | None = None,
) -> torch.Tensor:
    """The radial (Mq, Mk) bool block mask (a fresh copy of the cached one)."""
    grid = tuple(int(g) for g in grid)
    if keep is not None:
        return _radial_fit(grid, block_q, block_k, float(keep), bool(sink)).clone()
    return _radial_mask(grid, block_q, block_k, float(decay), bool(sink)).clone()


@functools.lru_cache(maxsize=64)
def _window_mask(
    grid: tuple[int, int, int], block_q: int, block_k: int, radii: tuple[int, int, int]
) -> torch.Tensor:
    t, h, w = grid
    rt, rh, rw = radii

    def rule(rq, q_lo, q_hi, rk, k_lo, k_hi):
        near_t = (rq // h - rk // h).abs() <= rt
        near_h = (rq % h - rk % h).abs() <= rh
        return near_t & near_h & (gap(q_lo, q_hi, k_lo, k_hi) <= rw)

    return runs_block_mask(t * h * w, block_q, block_k, w, rule)


@functools.lru_cache(maxsize=64)
def _window_fit(
    grid: tuple[int, int, int], block_q: int, block_k: int, keep: float
) -> torch.Tensor:
    steps = 64

    def build(j: int) -> torch.Tensor:
        radii = tuple(round(j / steps * (g - 1)) for g in grid)
        return _window_mask(grid, block_q, block_k, radii)

    return fit_to_keep(keep, build, steps, math.prod(grid), block_q, block_k)


def window_block_mask(
    grid: tuple[int, int, int],
    block_q: int = 128,
    block_k: int = 128,
    radii: tuple[int, int, int] = (1, 8, 8),
    keep: float | None = None,
) -> torch.Tensor:
    """The 3D local window (Mq, Mk) bool block mask (a fresh copy of the cached one)."""
    grid = tuple(int(g) for g in grid)
    if keep is not None:
        return _window_fit(grid, block_q, block_k, float(keep)).clone()
    return _window_mask(grid, block_q, block_k, tuple(int(r) for r in radii)).clone()


@functools.lru_cache(maxsize=64)
def _csr_on(
    build: Callable[..., torch.Tensor], args: tuple, n: int, block_q: int, block_k: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR rows (1, 1, Mq, Kmax) and counts (1, 1, Mq) of ``build(*args)`` on ``device``:
    built, checked and copied once per (mask, device), so later calls neither build nor copy."""
    mask = build(*args)
    layout = BlockLayout.from_dense(mask[None, None], n, n, block_q, block_k)
    return layout.kv_indices.to(device), layout.kv_counts.to(device)


def _static_layout(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Any,
    block_q: int,
    block_k: int,
    build: Callable[..., torch.Tensor],
    args: tuple,
) -> BlockLayout:
    """The layout of the static mask ``build(grid, *args)``, the same for every (batch, head)."""
    if grid is None:
        raise ValueError(f"{name} needs grid=(T, H, W), the latent video grid of the tokens")
    grid = check_grid(grid, k.shape[2])
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{name} is a self-attention mask: q has {q.shape[2]} tokens but k has {k.shape[2]}"
        )
    b, h = q.shape[:2]
    n = k.shape[2]
    indices, counts = _csr_on(build, (grid, *args), n, block_q, block_k, q.device)
    return BlockLayout(
        indices.expand(b, h, *indices.shape[2:]),
        counts.expand(b, h, counts.shape[2]),
        n,
        n,
        block_q,
        block_k,
        check=False,
    )


@registry.selection("radial", granularity="block", summary="static energy-decay mask from grid")
@dataclass(frozen=True)
class Radial:
    """Radial attention: temporal bands with halving spatial windows and a first-frame sink."""

    keep: float | None = None
    decay: float = 0.2
    sink: bool = True
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        if self.keep is not None:
            check_fraction(self.keep, "keep")
        check_positive(self.decay, "decay")
        if not isinstance(self.sink, bool):
            raise TypeError(f"sink must be true or false, got {self.sink!r}")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: Any = None,
    ) -> BlockLayout:
        args = (self.block_q, self.block_k, self.decay, self.sink, self.keep)
        return _static_layout(
            "radial", q, k, grid, self.block_q, self.block_k, radial_block_mask, args
        )


@registry.selection("window", granularity="block", summary="static 3D local window over grid")
@dataclass(frozen=True)
class Window:
    """3D local window: |dt| <= t, |dh| <= h, |dw| <= w (radii in latent tokens)."""

    keep: float | None = None
    t: int = 1
    h: int = 8
    w: int = 8
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        if self.keep is not None:
            check_fraction(self.keep, "keep")
        for name in ("t", "h", "w"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"window radius {name} must be an integer >= 0, got {value!r}")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: Any = None,
    ) -> BlockLayout:
        args = (self.block_q, self.block_k, (self.t, self.h, self.w), self.keep)
        return _static_layout(
            "window", q, k, grid, self.block_q, self.block_k, window_block_mask, args
        )

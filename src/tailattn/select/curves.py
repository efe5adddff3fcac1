r"""Space-filling curve orders of the latent grid (T, H, W): 3D Hilbert and generalized Hilbert.

A block-sparse method cuts the token sequence into runs of 128; in (t, h, w) row-major order a
run is a sliver of one or two grid rows, while along a space-filling curve it is a compact
box, so the tokens of a block attend alike and a block's pooled score represents them better
(DFSAttn; Rectified SpaAttn optionally).

* ``hilbert``: the 3D Hilbert curve of the cube of side 2^bits, bits = ceil(log2 max(T, H, W))
  (docs/methods.md section 5), restricted to the grid: grid points sorted by their Hilbert index,
  points outside the grid skipped (so on a non-cube grid the order jumps where the cube curve
  leaves the grid). The index is Skilling's transpose construction ("Programming the Hilbert
  curve", AIP Conf. Proc. 707, 2004): undo the excess rotations from the top bit down, Gray-code
  the axes, then interleave their bits.
* ``gilbert``: a generalized Hilbert curve for any side lengths (the idea of Cerveny's
  "gilbert"; this recursion is ours). ``fill(s, a, b, c)`` fills the box spanned by the signed
  axis vectors a, b, c from its corner s to the corner s + a - sign(a) on the a edge:

  - a much longer than b and c (2|a| > 3|b| and 2|a| > 3|c|): two halves along a,
    ``fill(s, a', b, c)`` then ``fill(s + a', a - a', b, c)``;
  - a roughly cubic box (every side >= 2, none more than twice another): the eight octants in
    the 3D Hilbert order (one halving bit flips per step: 000, 001, 011, 010, 110, 111, 101,
    100 over a, b, c); entry and exit corners of every octant come from a small search
    (cached per box shape) such that each exit is one unit step from the next entry and each
    octant is crossed along a side of even length where possible;
  - otherwise split b (or c when |c| > |b|) together with a, three boxes::

        fill(s, b', c, a')                                   a in [0, a'),  b in [0, b')
        fill(s + b', a, b - b', c)                           all of a,      b in [b', |b|)
        fill(s + (a - da) + (b' - db), -b', c, -(a - a'))    a in [a', |a|), b in [0, b') back

  where a', b' are halves rounded to even lengths when possible (a corner-to-corner path along
  an even edge exists with unit steps). Each piece starts one unit step from where the previous
  one ended. On every power-of-two cube and on the Wan grids 21 x 30 x 52 and 21 x 45 x 80 all
  steps go to a grid neighbour; grids with odd sides can force a few face-diagonal steps, and
  no step is longer than that (L1 distance 2; tested on every grid up to 6 x 6 x 6).
* ``none``: row-major (t, h, w), the identity.

:func:`grid_order` returns the permutation of a whole sequence (video tokens along the curve,
then ``text_tokens`` text tokens last, in their order) and its inverse; it is a pure function
of its arguments, computed once per grid and cached (``functools.lru_cache``; callers get the
cached tensors and must not modify them).
"""

from __future__ import annotations

import functools
import math

import torch

CURVES = ("gilbert", "hilbert", "none")


def check_curve(curve: object) -> str:
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {CURVES}, got {curve!r}")
    return curve  # type: ignore[return-value]


def hilbert_index(coords: torch.Tensor, bits: int) -> torch.Tensor:
    """Hilbert index of integer points (P, 3) in the cube [0, 2^bits)^3, (P,) int64.

    Consecutive indices are grid neighbours (Skilling's transpose construction, module
    docstring).
    """
    x = [coords[:, i].clone().to(torch.int64) for i in range(3)]
    q = 1 << (bits - 1) if bits > 0 else 0
    while q > 1:  # undo the excess rotations, top bit first
        p = q - 1
        x[0] = torch.where((x[0] & q) != 0, x[0] ^ p, x[0])
        for i in (1, 2):
            hit = (x[i] & q) != 0
            swap = (x[0] ^ x[i]) & p
            x[0], x[i] = (
                torch.where(hit, x[0] ^ p, x[0] ^ swap),
                torch.where(hit, x[i], x[i] ^ swap),
            )
        q >>= 1
    for i in range(1, 3):  # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1) if bits > 0 else 0
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    index = torch.zeros_like(x[0])
    for bit in range(bits - 1, -1, -1):  # interleave: axis 0 holds the top bit of each triple
        for i in range(3):
            index = (index << 1) | ((x[i] >> bit) & 1)
    return index


def hilbert_order(grid: tuple[int, int, int]) -> torch.Tensor:
    """Row-major ids of the grid points in Hilbert-curve order, (T*H*W,) int64."""
    t, h, w = grid
    bits = max(1, math.ceil(math.log2(max(grid))))
    ids = torch.arange(t * h * w)
    coords = torch.stack([ids // (h * w), ids // w % h, ids % w], dim=1)
    return torch.argsort(hilbert_index(coords, bits), stable=True)


def _sign(v: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple((c > 0) - (c < 0) for c in v)  # type: ignore[return-value]


def _length(v: tuple[int, int, int]) -> int:
    return abs(v[0] + v[1] + v[2])


def _add(*vs: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(sum(c) for c in zip(*vs, strict=True))  # type: ignore[return-value]


def _scale(v: tuple[int, int, int], f: int) -> tuple[int, int, int]:
    return (v[0] * f, v[1] * f, v[2] * f)


def _half(v: tuple[int, int, int]) -> tuple[int, int, int]:
    """About half of an axis vector, rounded up to an even length when the side exceeds 2."""
    n = _length(v)
    half = n // 2
    if half % 2 and n > 2:
        half += 1
    return _scale(_sign(v), half)


_GRAY = ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, 0, 0))
"""Octants (bits along a, b, c) in the order of the 3D Hilbert curve: one bit flips per step."""

Corners = tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]


@functools.lru_cache(maxsize=4096)
def _octant_plan(sizes: tuple[int, int, int], halves: tuple[int, int, int]) -> Corners | None:
    """Entry and exit corners (local coordinates) of the 8 octants of a box, in Gray order.

    The curve enters the box at (0, 0, 0) and leaves at (w - 1, 0, 0); each octant's piece goes
    from its entry to its exit corner along one of its sides (its major side), and each exit is
    one unit step from the next entry. Major sides of even length (or octants with all sides
    odd) admit a path of unit steps; the search asks for that first, then for any plan.
    """

    def bounds(octant: tuple[int, int, int]) -> list[tuple[int, int]]:
        return [
            (0, halves[i] - 1) if octant[i] == 0 else (halves[i], sizes[i] - 1) for i in range(3)
        ]

    end = (sizes[0] - 1, 0, 0)

    def search(i: int, entry: tuple[int, int, int], strict: bool) -> list | None:
        box = bounds(_GRAY[i])
        side = [hi - lo + 1 for lo, hi in box]
        for axis in range(3):
            if side[axis] == 1 and max(side) > 1:
                continue
            if strict and side[axis] % 2 and not all(x % 2 for x in side):
                continue
            exit_ = list(entry)
            lo, hi = box[axis]
            exit_[axis] = hi if entry[axis] == lo else lo
            exit_t = (exit_[0], exit_[1], exit_[2])
            if i == 7:
                if exit_t == end:
                    return [(entry, exit_t)]
                continue
            flip = next(j for j in range(3) if _GRAY[i][j] != _GRAY[i + 1][j])
            up = _GRAY[i + 1][flip] == 1
            if exit_[flip] != (box[flip][1] if up else box[flip][0]):
                continue
            nxt = list(exit_)
            nxt[flip] += 1 if up else -1
            rest = search(i + 1, (nxt[0], nxt[1], nxt[2]), strict)
            if rest is not None:
                return [(entry, exit_t), *rest]
        return None

    plan = search(0, (0, 0, 0), True) or search(0, (0, 0, 0), False)
    return tuple(plan) if plan else None


def _octants(
    out: list[tuple[int, int, int]],
    s: tuple[int, int, int],
    axes: tuple[tuple[int, int, int], ...],
    plan: Corners,
    sizes: tuple[int, int, int],
    halves: tuple[int, int, int],
) -> None:
    """Fill the 8 octants of the box (s; axes) along ``plan`` (:func:`_octant_plan`)."""
    units = [_sign(v) for v in axes]
    for octant, (entry, exit_) in zip(_GRAY, plan, strict=True):
        lengths = [halves[i] if octant[i] == 0 else sizes[i] - halves[i] for i in range(3)]
        lows = [0 if octant[i] == 0 else halves[i] for i in range(3)]
        start = _add(s, *(_scale(units[i], entry[i]) for i in range(3)))
        vecs = [
            _scale(units[i], lengths[i] if entry[i] == lows[i] else -lengths[i]) for i in range(3)
        ]
        major = next((i for i in range(3) if entry[i] != exit_[i]), 0)
        others = sorted((i for i in range(3) if i != major), key=lambda i: -lengths[i])
        _fill(out, start, vecs[major], vecs[others[0]], vecs[others[1]])


def _fill(
    out: list[tuple[int, int, int]],
    s: tuple[int, int, int],
    a: tuple[int, int, int],
    b: tuple[int, int, int],
    c: tuple[int, int, int],
) -> None:
    """Append the points of the box (s; a, b, c) along the generalized curve (module docstring)."""
    w, h, d = _length(a), _length(b), _length(c)
    if w == 0 or h == 0 or d == 0:
        return
    if h == 1 and d == 1:
        da = _sign(a)
        out.extend(_add(s, _scale(da, i)) for i in range(w))
        return
    if w == 1:  # a slab across a: fill it along its longer side
        if h >= d:
            _fill(out, s, b, c, a)
        else:
            _fill(out, s, c, a, b)
        return
    da, a2 = _sign(a), _half(a)
    rest_a = _add(a, _scale(a2, -1))
    if 2 * w > 3 * h and 2 * w > 3 * d:
        _fill(out, s, a2, b, c)
        _fill(out, _add(s, a2), rest_a, b, c)
        return
    if min(h, d) >= 2 and max(w, h, d) <= 2 * min(w, h, d):
        sizes, halves = (w, h, d), (_length(a2), _length(_half(b)), _length(_half(c)))
        plan = _octant_plan(sizes, halves)
        if plan is not None:
            _octants(out, s, (a, b, c), plan, sizes, halves)
            return
    if h >= d:
        db, b2 = _sign(b), _half(b)
        _fill(out, s, b2, c, a2)
        _fill(out, _add(s, b2), a, _add(b, _scale(b2, -1)), c)
        back = _add(s, a, _scale(da, -1), b2, _scale(db, -1))
        _fill(out, back, _scale(b2, -1), c, _scale(rest_a, -1))
    else:
        dc, c2 = _sign(c), _half(c)
        _fill(out, s, c2, a2, b)
        _fill(out, _add(s, c2), a, b, _add(c, _scale(c2, -1)))
        back = _add(s, a, _scale(da, -1), c2, _scale(dc, -1))
        _fill(out, back, _scale(c2, -1), _scale(rest_a, -1), b)


def gilbert_order(grid: tuple[int, int, int]) -> torch.Tensor:
    """Row-major ids of the grid points along the generalized Hilbert curve, (T*H*W,) int64.

    The curve runs along the longest side first, so it starts at (0, 0, 0) and ends on the far
    end of that side.
    """
    t, h, w = grid
    axes = sorted(((w, (0, 0, 1)), (h, (0, 1, 0)), (t, (1, 0, 0))), key=lambda e: -e[0])
    a, b, c = (_scale(unit, n) for n, unit in axes)
    points: list[tuple[int, int, int]] = []
    _fill(points, (0, 0, 0), a, b, c)
    coords = torch.tensor(points, dtype=torch.int64)
    return coords[:, 0] * h * w + coords[:, 1] * w + coords[:, 2]


@functools.lru_cache(maxsize=32)
def grid_order(
    grid: tuple[int, int, int],
    curve: str,
    text_tokens: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation (video tokens along ``curve``, then the text tokens) and its inverse.

    Returns ``perm`` and ``inverse`` (N,) int64 on ``device``, N = T*H*W + text_tokens:
    position j of the reordered sequence holds token ``perm[j]``, and ``inverse[perm[j]] = j``.
    Cached per (grid, curve, text_tokens, device), so a GPU caller copies them once; the
    returned tensors are shared, do not modify them.
    """
    if torch.device(device).type != "cpu":
        return tuple(x.to(device) for x in grid_order(grid, curve, text_tokens))  # type: ignore[return-value]
    check_curve(curve)
    n_video = grid[0] * grid[1] * grid[2]
    if curve == "hilbert":
        video = hilbert_order(grid)
    elif curve == "gilbert":
        video = gilbert_order(grid)
    else:
        video = torch.arange(n_video)
    perm = torch.cat([video, torch.arange(n_video, n_video + text_tokens)])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm, inverse

"""Static masks from the grid: radial and window, against hand-computed and brute-force masks."""

import math

import pytest
import torch

import tailattn
from tailattn.select import Radial, Window, radial_block_mask, window_block_mask
from tailattn.select.static import density_of


def radial_keeps(i, j, grid, block_k, decay, sink):
    """The radial token rule, written out for one (query, key) pair."""
    frame = grid[1] * grid[2]
    tq, sq = divmod(i, frame)
    tk, sk = divmod(j, frame)
    d = abs(tq - tk)
    if sink and tk == 0:
        return True
    radius = frame if d == 0 else decay * frame / 2 ** (d.bit_length() - 1)
    if radius >= block_k:
        return abs(sq - sk) <= radius
    return d % math.ceil(block_k / radius) == 0 and abs(sq - sk) <= block_k


def window_keeps(i, j, grid, radii):
    _, h, w = grid
    (tq, rq), (tk, rk) = divmod(i, h * w), divmod(j, h * w)
    (hq, wq), (hk, wk) = divmod(rq, w), divmod(rk, w)
    return abs(tq - tk) <= radii[0] and abs(hq - hk) <= radii[1] and abs(wq - wk) <= radii[2]


def blocks_of(rule, n, bq, bk):
    """Block pair kept when any of its token pairs is: brute force over all token pairs."""
    mask = torch.zeros(math.ceil(n / bq), math.ceil(n / bk), dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if rule(i, j):
                mask[i // bq, j // bk] = True
    return mask


def test_radial_hand_computed_one_block_per_frame():
    # grid 5 x 2 x 2: 4 tokens per frame = one block. decay 1: r(1) = 4 (whole frame),
    # r(2) = r(3) = 2 < 4 -> stride 2 (d = 2 kept, 3 not), r(4) = 1 -> stride 4 (d = 4 kept).
    frames = [[1, 1, 1, 0, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 0, 1, 1, 1]]
    expected = torch.tensor(frames, dtype=torch.bool)
    got = radial_block_mask((5, 2, 2), 4, 4, decay=1.0, sink=False)
    assert torch.equal(got, expected)
    expected[:, 0] = True  # the sink: every query keeps the first frame
    assert torch.equal(radial_block_mask((5, 2, 2), 4, 4, decay=1.0, sink=True), expected)


def test_radial_hand_computed_spatial_window():
    # grid 2 x 4 x 4: 16 tokens per frame, blocks of 4 in-frame positions (s 0-3, 4-7, ...).
    # decay 0.5: r(1) = 8, so in-frame blocks whose positions are more than 8 apart are
    # dropped across frames: s 0-3 vs 12-15 (gap 9).
    cross = torch.ones(4, 4, dtype=torch.bool)
    cross[0, 3] = cross[3, 0] = False
    same = torch.ones(4, 4, dtype=torch.bool)
    expected = torch.cat([torch.cat([same, cross], 1), torch.cat([cross, same], 1)])
    got = radial_block_mask((2, 4, 4), 4, 4, decay=0.5, sink=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("grid", "bq", "bk", "decay", "sink"),
    [((9, 3, 5), 8, 8, 0.5, True), ((6, 4, 4), 16, 8, 0.2, False), ((17, 2, 3), 4, 4, 0.7, True)],
)
def test_radial_matches_the_token_rule(grid, bq, bk, decay, sink):
    n = math.prod(grid)
    expected = blocks_of(lambda i, j: radial_keeps(i, j, grid, bk, decay, sink), n, bq, bk)
    assert torch.equal(radial_block_mask(grid, bq, bk, decay, sink), expected)


@pytest.mark.parametrize(
    ("grid", "bq", "bk", "radii"),
    [((3, 4, 5), 8, 8, (1, 1, 2)), ((2, 5, 7), 16, 4, (0, 2, 1)), ((4, 3, 3), 5, 7, (2, 0, 0))],
)
def test_window_matches_the_token_rule(grid, bq, bk, radii):
    n = math.prod(grid)
    expected = blocks_of(lambda i, j: window_keeps(i, j, grid, radii), n, bq, bk)
    assert torch.equal(window_block_mask(grid, bq, bk, radii), expected)


def test_window_hand_computed():
    # grid 1 x 2 x 4, blocks of 2: (row 0, w 0-1), (row 0, w 2-3), (row 1, w 0-1), (row 1, w 2-3)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
    assert torch.equal(window_block_mask((1, 2, 4), 2, 2, (0, 0, 1)), expected)
    # |dh| <= 1 but |dw| = 0: columns w 0-1 never meet columns w 2-3
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]).bool()
    assert torch.equal(window_block_mask((1, 2, 4), 2, 2, (0, 1, 0)), expected)


def test_radial_kept_keys_grow_like_log_frames():
    """O(n log n): per query, kept keys / frame size grows with log T, not with T."""
    per_query = []
    for t in (16, 64):
        mask = radial_block_mask((t, 16, 16), 128, 128, decay=0.5)
        per_query.append(density_of(mask, t * 256, 128, 128) * t)  # kept frames per query
    assert per_query[1] < 2 * per_query[0]


@pytest.mark.parametrize("name", ["radial", "window"])
def test_keep_fits_the_density(name):
    fit = radial_block_mask if name == "radial" else window_block_mask
    grid = (12, 8, 8)
    densities = [density_of(fit(grid, 64, 64, keep=keep), 768, 64, 64) for keep in (0.4, 0.7, 1)]
    assert densities[0] <= 0.4 and densities[1] <= 0.7 and densities[2] == 1.0
    assert densities[0] <= densities[1]
    sparsest = radial_block_mask((4, 16, 16), 128, 128, keep=1e-3)  # own frame + sink > 0.001
    assert torch.equal(sparsest, radial_block_mask((4, 16, 16), 128, 128, decay=2**-12))


def test_cached_masks_are_copies():
    a = radial_block_mask((4, 4, 4), 16, 16)
    a.fill_(False)
    assert radial_block_mask((4, 4, 4), 16, 16).any()


def test_static_selections_through_attention(skewed):
    q, k, v = skewed(seed=1, n=4 * 8 * 8)
    for spec in ("radial(decay=0.5)+uta", "window(t=1, h=2, w=2)+blocks"):
        out, info = tailattn.attention(
            q, k, v, spec, grid=(4, 8, 8), block_q=32, block_k=32, return_info=True
        )
        kind = Radial if spec.startswith("radial") else Window
        assert isinstance(tailattn.registry.bind(spec).selection, kind)
        assert info["density"] < 1 and torch.isfinite(out).all()


def test_grid_errors(skewed):
    q, k, v = skewed(seed=2, n=96)
    for spec in ("radial", "window"):
        with pytest.raises(ValueError, match=f"{spec} needs grid=\\(T, H, W\\)"):
            tailattn.attention(q, k, v, spec)
        with pytest.raises(ValueError, match="grid .* holds 100 tokens"):
            tailattn.attention(q, k, v, spec, grid=(4, 5, 5))
        with pytest.raises(ValueError, match="self-attention mask: q has 48 tokens"):
            Radial()(q[:, :, :48], k, scale=0.1, grid=(4, 4, 6))
    with pytest.raises(ValueError, match="decay must be positive"):
        Radial(decay=0)
    with pytest.raises(ValueError, match="window radius h must be an integer >= 0"):
        Window(h=-1)
    with pytest.raises(TypeError, match="sink must be true or false"):
        Radial(sink="yes")

"""3D curve orders: permutations, neighbour steps, locality against row-major, the cache."""

import itertools

import pytest
import torch

from tailattn.select.curves import gilbert_order, grid_order, hilbert_index, hilbert_order


def coords_of(order, grid):
    _, h, w = grid
    return torch.stack([order // (h * w), order // w % h, order % w], dim=1)


def steps(order, grid):
    """L1 grid distance between consecutive points of an order."""
    c = coords_of(order, grid)
    return (c[1:] - c[:-1]).abs().sum(dim=1)


def is_permutation(order, n):
    return order.numel() == n and torch.equal(order.sort().values, torch.arange(n))


def run_spread(order, grid, run=128):
    """Mean L1 distance of a run's points to the run's mean point: small when runs are compact."""
    c = coords_of(order, grid).double()
    n = c.shape[0] // run * run
    runs = c[:n].view(-1, run, 3)
    return float((runs - runs.mean(dim=1, keepdim=True)).abs().sum(-1).mean())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_hilbert_on_a_cube_is_a_path_of_unit_steps(bits):
    side = 2**bits
    order = hilbert_order((side, side, side))
    assert is_permutation(order, side**3)
    assert bool((steps(order, (side, side, side)) == 1).all())


def test_hilbert_index_is_a_bijection_onto_the_cube():
    pts = torch.tensor(list(itertools.product(range(8), repeat=3)))
    index = hilbert_index(pts, 3)
    assert torch.equal(index.sort().values, torch.arange(512))


def test_every_grid_up_to_6_gives_permutations_and_gilbert_steps_at_most_2():
    for grid in itertools.product(range(1, 7), repeat=3):
        n = grid[0] * grid[1] * grid[2]
        assert is_permutation(hilbert_order(grid), n), grid
        order = gilbert_order(grid)
        assert is_permutation(order, n), grid
        if n > 1:
            # consecutive tokens are grid neighbours or face-diagonal neighbours
            assert int(steps(order, grid).max()) <= 2, grid


@pytest.mark.parametrize("grid", [(4, 4, 4), (8, 8, 8), (2, 4, 8), (13, 16, 16), (1, 30, 52)])
def test_gilbert_is_a_unit_step_path_on_even_and_cube_grids(grid):
    assert bool((steps(gilbert_order(grid), grid) == 1).all())


def test_gilbert_is_a_unit_step_path_on_wan_grid_and_runs_are_compact():
    grid = (21, 30, 52)
    gil, hil = gilbert_order(grid), hilbert_order(grid)
    rowmajor = torch.arange(21 * 30 * 52)
    assert bool((steps(gil, grid) == 1).all())
    assert float((steps(hil, grid) == 1).double().mean()) < 1.0  # the cube curve jumps
    # runs of 128 tokens (one block) are far more compact along the curves than row-major
    spread = {name: run_spread(o, grid) for name, o in (("g", gil), ("h", hil), ("r", rowmajor))}
    assert spread["g"] < 0.4 * spread["r"] and spread["h"] < 0.4 * spread["r"]


def test_two_dimensional_slabs_are_unit_step_paths():
    for grid in ((1, 30, 52), (1, 7, 9), (5, 1, 12)):
        assert bool((steps(gilbert_order(grid), grid) == 1).all()), grid


def test_grid_order_keeps_text_last_inverts_and_is_cached():
    perm, inverse = grid_order((3, 4, 5), "gilbert", 7)
    assert is_permutation(perm, 67)
    assert torch.equal(perm[60:], torch.arange(60, 67))
    assert torch.equal(inverse[perm], torch.arange(67))
    assert grid_order((3, 4, 5), "gilbert", 7)[0] is perm
    assert torch.equal(grid_order((3, 4, 5), "none")[0], torch.arange(60))
    with pytest.raises(ValueError, match="curve must be one of"):
        grid_order((3, 4, 5), "zorder")

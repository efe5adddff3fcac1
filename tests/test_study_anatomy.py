"""Locality of the anatomy: the mass near the query on the token grid and in its own frame."""

import math

import torch

from tailattn.study.anatomy import AnatomyAccumulator, locality
from tailattn.study.chunk import Chunk


def test_uniform_rows_put_their_mass_by_the_number_of_keys():
    """Grid (3, 8, 8) and 2 text tokens, uniform rows: a corner query has 2 x 4 x 4 keys within
    1 frame and 3 tokens, 64 in its frame; text tokens count as neither."""
    grid, n = (3, 8, 8), 3 * 8 * 8 + 2
    rows = torch.tensor([0, 2 * 64 + 7 * 8 + 7])  # (0, 0, 0) and (2, 7, 7)
    chunk = Chunk(
        rows, torch.zeros(2, n, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    )
    stats = locality(chunk, grid)
    assert stats["local_mass"].tolist() == [32 / n, 32 / n]
    assert stats["frame_mass"].tolist() == [64 / n, 64 / n]
    assert all(math.isnan(x) for x in locality(chunk, None)["local_mass"].tolist())


def test_a_row_on_one_far_key_has_no_local_mass():
    grid, n = (4, 8, 8), 256
    z = torch.full((1, n), -1e9, dtype=torch.float64)
    z[0, 3 * 64 + 7 * 8 + 7] = 0.0  # the opposite corner
    accumulator = AnatomyAccumulator()
    accumulator.add(Chunk(torch.tensor([0]), z, torch.zeros(n, 1, dtype=torch.float64)), 0, grid)
    means = accumulator.means()
    assert means["local_mass"] == 0.0 and means["frame_mass"] == 0.0
    assert means["top1_mass"] == 1.0

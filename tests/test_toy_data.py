"""The toy data generator: deterministic clips of bouncing shapes."""

import pytest
import torch

from tailattn.toy import data


def test_same_seed_same_clips_and_different_seed_different_clips():
    a, labels_a = data.clips(7, 3)
    b, labels_b = data.clips(7, 3)
    c, _ = data.clips(8, 3)
    assert torch.equal(a, b)
    assert torch.equal(labels_a, labels_b)
    assert not torch.equal(a, c)


def test_shape_range_and_given_labels():
    labels = torch.tensor([0, 1, 2, 3])
    video, got = data.clips(1, 4, labels=labels)
    assert video.shape == (4, data.CHANNELS, data.FRAMES, data.SIZE, data.SIZE)
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(got, labels)


def test_clips_move():
    video, _ = data.clips(3, 4)
    change = (video[:, :, 1:] - video[:, :, :-1]).abs().amax(dim=(1, 3, 4))
    assert bool((change > 0.1).all())


def test_bounce_stays_inside_and_keeps_speed():
    start = torch.tensor([5.0, 20.0, 27.0])
    velocity = torch.tensor([1.5, -1.7, 0.9])
    radius = torch.tensor([5.0, 4.0, 4.5])
    path = data._bounce(start, velocity, radius)
    assert path.shape == (3, data.FRAMES)
    assert bool((path >= radius[:, None] - 1e-5).all())
    assert bool((path <= data.SIZE - radius[:, None] + 1e-5).all())
    steps = (path[:, 1:] - path[:, :-1]).abs()
    assert bool((steps <= velocity.abs()[:, None] + 1e-5).all())
    assert torch.allclose(path[:, 0], start)


def test_each_shape_covers_a_different_area():
    """Square > disc > cross and triangle at equal radius (areas 4r^2, pi r^2, ...)."""
    dx, dy = torch.meshgrid(torch.arange(-10, 10.0), torch.arange(-10, 10.0), indexing="xy")
    r = torch.tensor(6.0)
    grid = (1, 1, 1, *dx.shape)
    areas = [
        float(
            (0.5 - data._signed_distance(torch.tensor([kind]), dx.view(grid), dy.view(grid), r))
            .clamp(0, 1)
            .sum()
        )
        for kind in range(len(data.SHAPES))
    ]
    square, disc, triangle, cross = areas
    assert square == pytest.approx(4 * 36, rel=0.05)
    assert disc == pytest.approx(torch.pi * 36, rel=0.05)
    assert square > disc > max(triangle, cross) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        data.clips(0, 0)
    with pytest.raises(ValueError, match="labels"):
        data.clips(0, 2, labels=torch.tensor([0, 9]))

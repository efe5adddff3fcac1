"""The toy data generator: deterministic scenes of textured shapes under a moving camera."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tailattn.toy import data, scene
from threads import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"frames": 4, "size": 16}


def test_same_seed_same_clips_and_different_seed_different_clips():
    a, labels_a = data.clips(7, 3, **SMALL)
    b, labels_b = data.clips(7, 3, **SMALL)
    c, _ = data.clips(8, 3, **SMALL)
    assert torch.equal(a, b)
    assert torch.equal(labels_a, labels_b)
    assert not torch.equal(a, c)


def test_shape_range_and_given_labels():
    labels = torch.tensor([0, 1, 2, 3])
    video, got = data.clips(1, 4, labels=labels, frames=3, size=10)
    assert video.shape == (4, data.CHANNELS, 3, 10, 10)
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(got, labels)


def test_clips_move():
    video, _ = data.clips(3, 4, **SMALL)
    change = (video[:, :, 1:] - video[:, :, :-1]).abs().amax(dim=(1, 3, 4))
    assert bool((change > 0.1).all())


def test_one_scene_renders_alike_at_two_resolutions():
    """A scene is in world units: the 32-px clip averaged down 2 x 2 is the 16-px clip up to
    the sub-pixel detail that the finer rendering resolves."""
    drawn = scene.draw(5, 4)
    fine, coarse = data.render(drawn, 2, 32), data.render(drawn, 2, 16)
    pooled = F.avg_pool3d(fine, (1, 2, 2))
    assert float((pooled - coarse).abs().mean()) < 0.02


def test_bounce_stays_inside_and_keeps_speed():
    start = torch.tensor([0.2, 0.6, 0.85])
    velocity = torch.tensor([1.3, -0.9, 0.2])
    radius = torch.tensor([0.12, 0.1, 0.14])
    tau = torch.linspace(0, 1, 33)
    path = data.bounce(start, velocity, radius, tau)
    assert path.shape == (3, 33)
    assert bool((path >= radius[:, None] - 1e-6).all())
    assert bool((path <= 1 - radius[:, None] + 1e-6).all())
    steps = (path[:, 1:] - path[:, :-1]).abs()
    assert bool((steps <= velocity.abs()[:, None] / 32 + 1e-6).all())
    assert torch.allclose(path[:, 0], start)


def test_unit_shapes_have_their_areas():
    """Coverage areas at radius R px: square 4, disc pi, triangle (inradius 1/2) 3 sqrt(3) / 4,
    cross 20 / 9, times R^2."""
    radius = 12.0
    offsets = torch.arange(-20, 20.0) + 0.5
    ly, lx = torch.meshgrid(offsets / radius, offsets / radius, indexing="ij")
    areas = [
        float((0.5 - radius * data.signed_distance(torch.tensor(kind), lx, ly)).clamp(0, 1).sum())
        for kind in range(len(data.SHAPES))
    ]
    expected = [4.0, torch.pi, 3 * 3**0.5 / 4, 20 / 9]
    assert areas == pytest.approx([e * radius**2 for e in expected], rel=0.03)


def test_draws_are_in_paint_order_with_slow_and_fast_objects():
    drawn = scene.draw(11, 64)
    assert bool((drawn.depth[:, 1:] <= drawn.depth[:, :-1]).all())
    assert 2 <= int(drawn.present.sum(dim=1).min()) <= int(drawn.present.sum(dim=1).max()) == 3
    speed = drawn.velocity.norm(dim=-1)
    slow, fast = (speed <= 0.35 + 1e-6), (speed >= 0.7 - 1e-6)
    assert bool((slow | fast).all()) and bool(slow.any()) and bool(fast.any())
    # the colours of one clip are distinct
    assert bool((drawn.colour[:, 0] != drawn.colour[:, 1]).any(dim=-1).all())


def _plain(seed=0, **changes):
    """One clip of white plain squares on black, no lighting, still camera and objects."""
    drawn = scene.draw(seed, 1, labels=torch.tensor([0]))
    k = scene.OBJECTS
    base = {
        "pan": torch.zeros(1, 2),
        "zoom": torch.zeros(1),
        "ground": torch.zeros(1, 2, 3),
        "gradient": torch.zeros(1),
        "present": torch.tensor([[False] * (k - 1) + [True]]),
        "pattern": torch.zeros(1, k, dtype=torch.int64),
        "start": torch.full((1, k, 2), 0.5),
        "velocity": torch.zeros(1, k, 2),
        "angle": torch.zeros(1, k),
        "spin": torch.zeros(1, k),
        "radius": torch.full((1, k), 0.15),
        "colour": torch.ones(1, k, 3),
        "light": torch.zeros(1, 6),
    }
    return replace(drawn, **{**base, **changes})


def test_zoom_grows_objects_and_pan_moves_them():
    """Zoom rate 0.4 per clip: the area grows by exp(2 * 0.4 * (tau_3 - tau_0)); a pan of
    (0.2, 0) widths per clip moves a still object left by 0.2 * (tau_3 - tau_0) widths."""
    size, frames = 48, 4
    dtau = 0.75  # tau = (f + 1/2) / 4
    zoomed = data.render(_plain(zoom=torch.tensor([0.4])), frames, size)
    area = (zoomed[0, 0] > 0).float().sum(dim=(1, 2))
    assert float(area[-1] / area[0]) == pytest.approx(math.exp(0.8 * dtau), rel=0.1)
    panned = data.render(_plain(pan=torch.tensor([[0.2, 0.0]])), frames, size)
    weight = (panned[0, 0] + 1).clamp_min(0)
    columns = torch.arange(size, dtype=torch.float32) + 0.5
    centre = (weight.sum(dim=1) * columns).sum(dim=1) / weight.sum(dim=(1, 2))
    assert float(centre[-1] - centre[0]) == pytest.approx(-0.2 * dtau * size, abs=0.5)


def test_nearer_objects_occlude_farther_ones():
    """Two objects at the same place: the centre shows the last painted (nearest) one."""
    k = scene.OBJECTS
    colour = torch.zeros(1, k, 3)
    colour[0, -2] = torch.tensor([1.0, 0.0, 0.0])
    colour[0, -1] = torch.tensor([0.0, 0.0, 1.0])
    present = torch.tensor([[False] * (k - 2) + [True, True]])
    video = data.render(_plain(colour=colour, present=present), 1, 16)
    centre = (video[0, :, 0, 7:9, 7:9].mean(dim=(1, 2)) + 1) / 2
    assert centre.tolist() == pytest.approx([0.0, 0.0, 1.0], abs=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        data.clips(0, 0)
    with pytest.raises(ValueError, match="labels"):
        data.clips(0, 2, labels=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="frames and size"):
        data.clips(0, 1, frames=0)

r"""The random draws behind the toy clips: one :class:`Scene` describes a batch of B clips.

Everything is in *world* units, independent of the rendering size: the world square [0, 1]^2 is
what the camera sees at the middle of the clip, and time ``tau`` runs over [0, 1] across the
clip, so one scene renders at any number of frames and any resolution (``data.render``).
All draws come from one ``torch.Generator`` seeded by ``seed``, on the CPU: a seed gives the
same scene on every device. Ranges (U: uniform):

- camera: one of still, pan, zoom, pan + zoom (equally likely); pan velocity up to 0.3 world
  widths per clip in a uniform direction, log-zoom rate ``+-U[0.2, 0.5]`` per clip;
- background: stripes, checkerboard or waves (a sum of three plane waves), each drifting, two
  dull colours, a vertical brightness gradient ``U[-0.4, 0.4]``;
- objects: ``OBJECTS`` slots, the last present with probability 1/2 (2 or 3 objects), all of
  the clip's shape kind (the label); depth ``U[0.75, 1.3]`` (slots sorted far to near: the paint
  order, so nearer objects occlude farther ones), radius ``U[0.10, 0.14] / depth``; a saturated
  colour from :data:`PALETTE` (distinct within a clip), a surface pattern (plain, stripes or
  rings, period ``U[0.5, 0.9]`` radii), rotation ``U[0, 2 pi)`` spinning ``U[-1.5, 1.5]`` rad per
  clip; speed slow ``U[0.1, 0.35]`` or fast ``U[0.7, 1.4]`` world widths per clip (even odds);
- lighting: a global gain ``1 + a sin(2 pi f tau + phi)`` with ``a`` 0 or ``U[0.1, 0.3]`` and
  ``f ~ U[0.25, 1.5]``, and a light gradient of strength ``U[0, 0.8]`` whose direction turns by
  ``U[-pi, pi]`` over the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("square", "disc", "triangle", "cross")
"""Shape kinds; the label of a clip is the index of its kind."""

OBJECTS = 3
"""Object slots per clip; the last one is present in half of the clips."""

PALETTE = (
    (0.95, 0.15, 0.15),
    (0.15, 0.85, 0.20),
    (0.20, 0.35, 0.95),
    (0.98, 0.85, 0.10),
    (0.95, 0.20, 0.90),
    (0.10, 0.90, 0.95),
    (1.00, 0.55, 0.05),
    (0.98, 0.98, 0.98),
)
"""Object colours (RGB in [0, 1])."""

BACKGROUNDS = ("stripes", "checker", "waves")
PATTERNS = ("plain", "stripes", "rings")


@dataclass(frozen=True)
class Scene:
    """The random draws of a batch of B clips (CPU tensors, float32 unless noted; K objects)."""

    labels: torch.Tensor  # (B,) int64 shape kind
    pan: torch.Tensor  # (B, 2) camera velocity, world widths per clip
    zoom: torch.Tensor  # (B,) log-zoom per clip
    background: torch.Tensor  # (B,) int64 index into BACKGROUNDS
    ground: torch.Tensor  # (B, 2, 3) the two background colours
    waves: torch.Tensor  # (B, 3, 4) per wave: cycles per width, angle, phase, drift per clip
    gradient: torch.Tensor  # (B,) vertical brightness gradient
    present: torch.Tensor  # (B, K) bool
    depth: torch.Tensor  # (B, K), descending along K (paint order)
    radius: torch.Tensor  # (B, K) world widths
    colour: torch.Tensor  # (B, K, 3)
    pattern: torch.Tensor  # (B, K) int64 index into PATTERNS
    period: torch.Tensor  # (B, K) pattern period in radii
    start: torch.Tensor  # (B, K, 2) position at tau = 0
    velocity: torch.Tensor  # (B, K, 2) world widths per clip
    angle: torch.Tensor  # (B, K) rotation at tau = 0
    spin: torch.Tensor  # (B, K) rotation per clip
    light: torch.Tensor  # (B, 6) gain a, f, phi; gradient strength, direction, turn

    def to(self, device: torch.device | str) -> Scene:
        """The same scene with every tensor on ``device``."""
        fields = self.__dataclass_fields__
        return Scene(**{name: getattr(self, name).to(device) for name in fields})


def _uniform(gen: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen)


def _labels(gen: torch.Generator, batch: int, labels: torch.Tensor | None) -> torch.Tensor:
    drawn = torch.randint(0, len(SHAPES), (batch,), generator=gen)
    if labels is None:
        return drawn
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if labels.shape != (batch,) or labels.min() < 0 or labels.max() >= len(SHAPES):
        raise ValueError(
            f"labels must be {batch} shape indices in [0, {len(SHAPES)}), got {labels}"
        )
    return labels


def _camera(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    mode = torch.randint(0, 4, (batch,), generator=gen)  # still, pan, zoom, pan + zoom
    heading = _uniform(gen, 0, 2 * math.pi, batch)
    speed = 0.3 * torch.rand(batch, generator=gen).sqrt() * (mode % 2 == 1)
    pan = speed[:, None] * torch.stack([heading.cos(), heading.sin()], dim=1)
    sign = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0)
    zoom = sign * _uniform(gen, 0.2, 0.5, batch) * (mode >= 2)
    return pan, zoom


def _objects(gen: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    k = OBJECTS
    present = torch.ones(batch, k, dtype=torch.bool)
    present[:, -1] = torch.rand(batch, generator=gen) < 0.5
    depth, order = _uniform(gen, 0.75, 1.3, batch, k).sort(dim=1, descending=True)
    present = present.gather(1, order)
    radius = _uniform(gen, 0.10, 0.14, batch, k) / depth
    colours = torch.argsort(torch.rand(batch, len(PALETTE), generator=gen), dim=1)[:, :k]
    start = radius[..., None] + (1 - 2 * radius[..., None]) * torch.rand(batch, k, 2, generator=gen)
    fast = torch.rand(batch, k, generator=gen) < 0.5
    speed = torch.where(fast, _uniform(gen, 0.7, 1.4, batch, k), _uniform(gen, 0.1, 0.35, batch, k))
    heading = _uniform(gen, 0, 2 * math.pi, batch, k)
    return {
        "present": present,
        "depth": depth,
        "radius": radius,
        "colour": torch.tensor(PALETTE)[colours],
        "pattern": torch.randint(0, len(PATTERNS), (batch, k), generator=gen),
        "period": _uniform(gen, 0.5, 0.9, batch, k),
        "start": start,
        "velocity": speed[..., None] * torch.stack([heading.cos(), heading.sin()], dim=-1),
        "angle": _uniform(gen, 0, 2 * math.pi, batch, k),
        "spin": _uniform(gen, -1.5, 1.5, batch, k),
    }


def _light(gen: torch.Generator, batch: int) -> torch.Tensor:
    flicker = torch.rand(batch, generator=gen) < 0.5
    return torch.stack(
        [
            _uniform(gen, 0.1, 0.3, batch) * flicker,  # gain amplitude
            _uniform(gen, 0.25, 1.5, batch),  # gain cycles per clip
            _uniform(gen, 0, 2 * math.pi, batch),  # gain phase
            _uniform(gen, 0, 0.8, batch),  # gradient strength
            _uniform(gen, 0, 2 * math.pi, batch),  # gradient direction at tau = 0
            _uniform(gen, -math.pi, math.pi, batch),  # its turn over the clip
        ],
        dim=1,
    )


def draw(seed: int, batch: int, labels: torch.Tensor | None = None) -> Scene:
    """The scenes of ``batch`` clips from ``seed`` (module docstring).

    Args:
        seed: the generator seed; equal seeds give equal scenes.
        batch: number of clips.
        labels: (batch,) shape kinds to use instead of random ones.

    Raises:
        ValueError: ``batch < 1`` or labels that are not ``batch`` shape indices.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    chosen = _labels(gen, batch, labels)
    pan, zoom = _camera(gen, batch)
    grey = _uniform(gen, 0.2, 0.6, batch, 2, 1)
    tint = 0.15 * (torch.rand(batch, 2, 3, generator=gen) - 0.5)
    cycles = torch.stack(
        [
            _uniform(gen, 3.0, 8.0, batch),
            _uniform(gen, 1.5, 4.0, batch),
            _uniform(gen, 1.5, 4.0, batch),
        ],
        dim=1,
    )
    waves = torch.stack(
        [
            cycles,
            _uniform(gen, 0, math.pi, batch, 3),
            _uniform(gen, 0, 2 * math.pi, batch, 3),
            _uniform(gen, -1.5, 1.5, batch, 3),
        ],
        dim=2,
    )
    return Scene(
        labels=chosen,
        pan=pan,
        zoom=zoom,
        background=torch.randint(0, len(BACKGROUNDS), (batch,), generator=gen),
        ground=(grey + tint).clamp(0, 1),
        waves=waves,
        gradient=_uniform(gen, -0.4, 0.4, batch),
        **_objects(gen, batch),
        light=_light(gen, batch),
    )

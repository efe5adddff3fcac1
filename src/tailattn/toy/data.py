r"""Procedural videos for the toy model: bouncing, occluding shapes on textured backgrounds.

A clip is 16 frames of 32 x 32 RGB, a tensor (3, 16, 32, 32) in [-1, 1] (channels, frames,
height, width: the layout of Wan latents). Its **label** is the shape kind, one of
:data:`SHAPES` (square, disc, triangle, cross); every clip shows :data:`OBJECTS` objects of
that kind in different colours and sizes.

Recipe (all random draws from one ``torch.Generator`` seeded by ``seed``, on the CPU, so a seed
gives the same clips on every device; only the rendering runs on ``device``):

- background: two dull colours ``c0, c1`` mixed by a texture ``m(x, y, t)`` in [0, 1], either
  stripes ``m = 1/2 + 1/2 sin(f (x cos a + y sin a) + phi + w t)`` (they drift, ``w`` rad per
  frame) or a checkerboard of cell size ``s`` that scrolls by ``(u, v)`` px per frame;
  pixel = ``c0 + m (c1 - c0)``.
- objects: radius ``r`` in [4, 7] px, a saturated colour from :data:`PALETTE` (distinct
  colours within a clip), start position and velocity (speed 0.7 to 1.8 px per frame); each
  coordinate bounces off the border: with ``L = size - 2r`` and ``u = p0 - r + v t``,
  ``p(t) = r + L - |(u mod 2L) - L|`` (a triangle wave). Object ``j + 1`` is drawn over object
  ``j`` (occlusion).
- shape masks are anti-aliased coverages ``clamp(1/2 - sd, 0, 1)`` of a signed distance ``sd``
  in pixels (pixel centres at ``i + 1/2``): square ``max(|dx|, |dy|) - r``; disc
  ``|d| - r``; triangle (apex up) ``max_k n_k . d - r/2`` over the three edge normals; cross
  ``min(max(|dx| - r, |dy| - r/3), max(|dx| - r/3, |dy| - r))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("square", "disc", "triangle", "cross")
"""Shape kinds; the label of a clip is the index of its kind."""

FRAMES, SIZE, CHANNELS = 16, 32, 3
OBJECTS = 2

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


@dataclass(frozen=True)
class ClipParams:
    """The random draws of a batch of B clips (CPU tensors, float32 unless noted)."""

    labels: torch.Tensor  # (B,) int64 shape kind
    radius: torch.Tensor  # (B, OBJECTS)
    colour: torch.Tensor  # (B, OBJECTS, 3)
    start: torch.Tensor  # (B, OBJECTS, 2) x, y in px
    velocity: torch.Tensor  # (B, OBJECTS, 2) px per frame
    background: torch.Tensor  # (B, 2, 3) the two background colours
    checker: torch.Tensor  # (B,) bool: checkerboard (else stripes)
    texture: torch.Tensor  # (B, 5) frequency, angle, phase, drift u, drift v


def draw(seed: int, batch: int, labels: torch.Tensor | None = None) -> ClipParams:
    """The random parameters of ``batch`` clips from ``seed`` (module docstring).

    Args:
        seed: the generator seed; equal seeds give equal parameters.
        batch: number of clips.
        labels: (batch,) shape kinds to use instead of random ones.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, len(SHAPES), (batch,), generator=gen)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if labels.shape != (batch,) or labels.min() < 0 or labels.max() >= len(SHAPES):
            raise ValueError(
                f"labels must be {batch} shape indices in [0, {len(SHAPES)}), got {labels}"
            )
        drawn = labels
    radius = 4.0 + 3.0 * torch.rand(batch, OBJECTS, generator=gen)
    colours = torch.argsort(torch.rand(batch, len(PALETTE), generator=gen), dim=1)[:, :OBJECTS]
    colour = torch.tensor(PALETTE)[colours]
    margin = radius[..., None]
    start = margin + (SIZE - 2 * margin) * torch.rand(batch, OBJECTS, 2, generator=gen)
    speed = 0.7 + 1.1 * torch.rand(batch, OBJECTS, generator=gen)
    angle = 2 * math.pi * torch.rand(batch, OBJECTS, generator=gen)
    velocity = speed[..., None] * torch.stack([angle.cos(), angle.sin()], dim=-1)
    grey = 0.15 + 0.45 * torch.rand(batch, 2, 1, generator=gen)
    tint = 0.12 * (torch.rand(batch, 2, 3, generator=gen) - 0.5)
    background = (grey + tint).clamp(0, 1)
    checker = torch.rand(batch, generator=gen) < 0.5
    texture = torch.stack(
        [
            0.35 + 0.6 * torch.rand(batch, generator=gen),  # stripe frequency (rad/px)
            math.pi * torch.rand(batch, generator=gen),  # stripe angle
            2 * math.pi * torch.rand(batch, generator=gen),  # phase
            torch.rand(batch, generator=gen) - 0.5,  # drift: rad/frame or px/frame in x
            torch.rand(batch, generator=gen) - 0.5,  # px/frame in y (checkerboard)
        ],
        dim=1,
    )
    return ClipParams(drawn, radius, colour, start, velocity, background, checker, texture)


def _bounce(start: torch.Tensor, velocity: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Positions (..., T) of a coordinate bouncing in [r, SIZE - r]: a triangle wave."""
    t = torch.arange(FRAMES, device=start.device, dtype=start.dtype)
    span = (SIZE - 2 * radius)[..., None].clamp_min(1e-3)
    u = start[..., None] - radius[..., None] + velocity[..., None] * t
    return radius[..., None] + span - ((u % (2 * span)) - span).abs()


def _signed_distance(
    kind: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Signed distance in px of each pixel to a shape of each kind (module docstring).

    ``kind`` (B,), ``dx, dy`` (B, OBJECTS, T, H, W), ``r`` broadcastable to them."""
    ax, ay = dx.abs(), dy.abs()
    square = torch.maximum(ax, ay) - r
    disc = torch.sqrt(dx * dx + dy * dy) - r
    normals = ((0.0, -1.0), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5))
    edges = torch.stack([nx * dx + ny * dy for nx, ny in normals]).amax(dim=0)
    triangle = edges - r / 2
    arm = r / 3
    cross = torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ax - arm, ay - r))
    all_kinds = torch.stack([square, disc, triangle, cross])  # order of SHAPES
    index = kind.view(1, -1, 1, 1, 1, 1).expand(1, *dx.shape)
    return all_kinds.gather(0, index)[0]


def render(params: ClipParams, device: torch.device | str = "cpu") -> torch.Tensor:
    """Clips (B, 3, FRAMES, SIZE, SIZE) in [-1, 1] from their parameters, on ``device``."""
    p = {name: getattr(params, name).to(device) for name in ClipParams.__dataclass_fields__}
    batch = p["labels"].shape[0]
    centres = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    ys, xs = centres.view(SIZE, 1), centres.view(1, SIZE)
    t = torch.arange(FRAMES, device=device, dtype=torch.float32).view(1, FRAMES, 1, 1)

    freq, angle, phase, du, dv = (p["texture"][:, i].view(batch, 1, 1, 1) for i in range(5))
    stripes = 0.5 + 0.5 * torch.sin(
        freq * (xs * angle.cos() + ys * angle.sin()) + phase + 0.6 * du * t
    )
    cell = 4.0 + 4.0 * (freq - 0.35) / 0.6
    cx = torch.floor((xs + du * t + phase) / cell)
    cy = torch.floor((ys + dv * t + phase) / cell)
    checker = ((cx + cy) % 2).float()
    mix = torch.where(p["checker"].view(batch, 1, 1, 1), checker, stripes)  # (B, T, H, W)
    c0 = p["background"][:, 0].view(batch, 3, 1, 1, 1)
    c1 = p["background"][:, 1].view(batch, 3, 1, 1, 1)
    video = c0 + mix[:, None] * (c1 - c0)

    r = p["radius"]
    px = _bounce(p["start"][..., 0], p["velocity"][..., 0], r)  # (B, OBJECTS, T)
    py = _bounce(p["start"][..., 1], p["velocity"][..., 1], r)
    dx = xs.view(1, 1, 1, 1, SIZE) - px[..., None, None]
    dy = ys.view(1, 1, 1, SIZE, 1) - py[..., None, None]
    dx, dy = torch.broadcast_tensors(dx, dy)
    sd = _signed_distance(p["labels"], dx, dy, r.view(batch, OBJECTS, 1, 1, 1))
    cover = (0.5 - sd).clamp(0, 1)  # (B, OBJECTS, T, H, W)
    for j in range(OBJECTS):
        alpha = cover[:, j, None]
        video = video + alpha * (p["colour"][:, j].view(batch, 3, 1, 1, 1) - video)
    return video * 2 - 1


def clips(
    seed: int,
    batch: int,
    device: torch.device | str = "cpu",
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` clips (B, 3, 16, 32, 32) in [-1, 1] and their labels (B,) from ``seed``."""
    params = draw(seed, batch, labels)
    return render(params, device), params.labels.to(device)

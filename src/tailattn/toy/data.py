r"""Procedural videos for the toy model: textured shapes in depth order under a moving camera.

A clip is a tensor (3, F, S, S) in [-1, 1] (channels, frames, height, width: the layout of Wan
latents), by default F = 16 frames of S = 64 pixels. Its **label** is the shape kind of its
objects, one of :data:`SHAPES`. The random draws are a :class:`scene.Scene` (world units, see
there); :func:`render` turns one into pixels at any F and S, batched on any device.

Rendering, per frame at time ``tau = (f + 1/2) / F`` and pixel centre ``s`` in [0, 1]^2 (on a
grid ``SUPERSAMPLE`` times finer, averaged down at the end, which anti-aliases every edge):

- camera: ``c(tau) = 1/2 + pan (tau - 1/2)``, ``z(tau) = exp(zoom (tau - 1/2))``; the objects'
  plane is seen at ``w = c + (s - 1/2) / z``, the background (twice as far: parallax) at
  ``w_b = 1/2 + (c - 1/2) / 2 + (s - 1/2) / sqrt(z)``.
- background: a mix ``m`` in [0, 1] of the two colours, ``c0 + m (c1 - c0)``, times
  ``1 + g (s_y - 1/2)``; with the plane waves ``phase_i = 2 pi (f_i (w . e(a_i)) + d_i tau) +
  phi_i``: stripes ``m = 1/2 + 1/2 sin(phase_0)``, a checkerboard of ``f_0`` cells per width in
  the frame rotated by ``a_0``, drifting ``d_0`` cells per clip, or waves
  ``m = sigmoid(sin(phase_0) / 2 + sin(phase_1) + sin(phase_2))``.
- objects, far to near: position ``p(tau)`` bouncing in ``[r, 1 - r]`` per coordinate (a
  triangle wave of ``p0 - r + v tau`` with period ``2 (1 - 2 r)``), rotation
  ``theta = theta0 + spin tau``; in the object's frame in radii, ``l = R(-theta)(w - p) / r``,
  a signed distance ``sd(l)`` of the unit shape: square ``max(|l_x|, |l_y|) - 1``, disc
  ``|l| - 1``, triangle (apex up) ``max_k n_k . l - 1/2`` over the three edge normals, cross
  ``min(max(|l_x| - 1, |l_y| - 1/3), max(|l_x| - 1/3, |l_y| - 1))``. Coverage
  ``clamp(1/2 - sd r z M, 0, 1)`` (``M`` supersampled pixels per frame width: ``sd`` in
  pixels). A soft shadow, the same shape offset by (0.25 r, 0.3 r), darkens what lies beneath by
  ``0.35 sigmoid(-sd / 0.15)``; then the object's colour, its pattern (stripes
  ``1/2 + 1/2 sin(2 pi l_x / period)`` or rings in ``|l|``) darkening it by up to 30 %, and a
  highlight ``1 + 0.3 clamp(-(w - p) . (1, 1) / (sqrt(2) r), -1, 1)`` from the top left, is
  painted over with that coverage.
- lighting: everything times ``1 + a sin(2 pi f tau + phi)`` and a light gradient
  ``1 + b (s - 1/2) . e(psi0 + turn tau)``, clamped to [0, 1]; the clip is ``2 y - 1``.
"""

from __future__ import annotations

import math

import torch

from .scene import OBJECTS, SHAPES, Scene, draw

__all__ = ["CHANNELS", "FRAMES", "OBJECTS", "SHAPES", "SIZE", "clips", "draw", "render"]

FRAMES, SIZE, CHANNELS = 16, 64, 3
"""The default clip: 16 frames of 64 x 64 RGB."""

SUPERSAMPLE = 2
"""Rendering grid per output pixel, per axis."""


def bounce(start: torch.Tensor, velocity: torch.Tensor, radius: torch.Tensor, tau: torch.Tensor):
    """Positions (..., T) at times ``tau`` (T,) of a coordinate bouncing in [r, 1 - r]."""
    span = (1 - 2 * radius)[..., None].clamp_min(1e-3)
    u = start[..., None] - radius[..., None] + velocity[..., None] * tau
    return radius[..., None] + span - ((u % (2 * span)) - span).abs()


def signed_distance(kind: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """Signed distance, in radii, of points ``l`` to the unit shape of each kind (module
    docstring); ``kind`` broadcasts against ``lx, ly``."""
    ax, ay = lx.abs(), ly.abs()
    square = torch.maximum(ax, ay) - 1
    disc = torch.sqrt(lx * lx + ly * ly) - 1
    normals = ((0.0, -1.0), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5))
    triangle = torch.stack([nx * lx + ny * ly for nx, ny in normals]).amax(dim=0) - 0.5
    arm = 1 / 3
    cross = torch.minimum(torch.maximum(ax - 1, ay - arm), torch.maximum(ax - arm, ay - 1))
    return torch.where(
        kind == 0, square, torch.where(kind == 1, disc, torch.where(kind == 2, triangle, cross))
    )


def _plane(
    scene: Scene, tau: torch.Tensor, s: torch.Tensor, distance: float, zoom: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where pixel centres ``s`` (M,) land on a plane ``distance`` times as far as the objects'
    (its pan divided by it: parallax), seen through ``zoom`` (B, F): ``w = 1/2 + pan (tau - 1/2)
    / distance + (s - 1/2) / zoom`` as wx (B, F, 1, M) and wy (B, F, M, 1)."""
    centre = 0.5 + scene.pan[:, None, :] * (tau[None, :, None] - 0.5) / distance  # (B, F, 2)
    z = zoom[..., None, None]
    wx = centre[..., 0, None, None] + (s.view(1, 1, 1, -1) - 0.5) / z
    wy = centre[..., 1, None, None] + (s.view(1, 1, -1, 1) - 0.5) / z
    return wx, wy


def _background(scene: Scene, tau: torch.Tensor, zoom: torch.Tensor, s: torch.Tensor):
    """(B, 3, F, M, M) background colours (module docstring)."""
    b = scene.labels.shape[0]
    sy = s.view(1, 1, -1, 1)
    wx, wy = _plane(scene, tau, s, 2.0, zoom.sqrt())
    f, a, phi, d = (scene.waves[..., i].view(b, 3, 1, 1, 1) for i in range(4))
    t = tau.view(1, 1, -1, 1, 1)
    along = wx[:, None] * a.cos() + wy[:, None] * a.sin()  # (B, 3, F, M, M)
    phase = 2 * math.pi * (f * along + d * t) + phi
    stripes = 0.5 + 0.5 * torch.sin(phase[:, 0])
    across = -wx * a[:, 0].sin() + wy * a[:, 0].cos()
    cells = torch.floor(f[:, 0] * along[:, 0] + d[:, 0] * t[:, 0]) + torch.floor(f[:, 0] * across)
    checker = cells % 2
    waves = torch.sigmoid(0.5 * torch.sin(phase[:, 0]) + phase[:, 1:].sin().sum(dim=1))
    kind = scene.background.view(b, 1, 1, 1)
    mix = torch.where(kind == 0, stripes, torch.where(kind == 1, checker, waves))
    c0 = scene.ground[:, 0].view(b, 3, 1, 1, 1)
    c1 = scene.ground[:, 1].view(b, 3, 1, 1, 1)
    shade = 1 + scene.gradient.view(b, 1, 1, 1, 1) * (sy[None] - 0.5)
    return (c0 + mix[:, None] * (c1 - c0)) * shade


def _local(
    dx: torch.Tensor, dy: torch.Tensor, theta: torch.Tensor, r: torch.Tensor, ox: float, oy: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Object-frame coordinates in radii, ``R(-theta)(d - o r) / r``, of offsets ``d`` from an
    object's centre shifted by ``o`` radii; ``theta`` (B, F)."""
    cos, sin = theta.cos()[..., None, None], theta.sin()[..., None, None]
    ex, ey = dx - ox * r, dy - oy * r
    return (cos * ex + sin * ey) / r, (cos * ey - sin * ex) / r


def _paint_objects(
    video: torch.Tensor, scene: Scene, tau: torch.Tensor, zoom: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """``video`` (B, 3, F, M, M) with the objects, shadows first, painted far to near."""
    b, m = scene.labels.shape[0], s.shape[0]
    wx, wy = _plane(scene, tau, s, 1.0, zoom)
    z = zoom[..., None, None]
    kind = scene.labels.view(b, 1, 1, 1)
    px = bounce(scene.start[..., 0], scene.velocity[..., 0], scene.radius, tau)  # (B, K, F)
    py = bounce(scene.start[..., 1], scene.velocity[..., 1], scene.radius, tau)
    theta = scene.angle[..., None] + scene.spin[..., None] * tau  # (B, K, F)
    for j in range(OBJECTS):
        r = scene.radius[:, j].view(b, 1, 1, 1)
        dx = wx - px[:, j, :, None, None]
        dy = wy - py[:, j, :, None, None]

        present = scene.present[:, j].view(b, 1, 1, 1).float()
        shadow = torch.sigmoid(
            -signed_distance(kind, *_local(dx, dy, theta[:, j], r, 0.25, 0.3)) / 0.15
        )
        video = video * (1 - 0.35 * present * shadow)[:, None]
        lx, ly = _local(dx, dy, theta[:, j], r, 0.0, 0.0)
        cover = (0.5 - signed_distance(kind, lx, ly) * r * z * m).clamp(0, 1) * present
        pattern = scene.pattern[:, j].view(b, 1, 1, 1)
        period = scene.period[:, j].view(b, 1, 1, 1)
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * lx / period)
        rings = 0.5 + 0.5 * torch.sin(2 * math.pi * torch.sqrt(lx * lx + ly * ly) / period)
        texture = torch.where(pattern == 1, stripes, torch.where(pattern == 2, rings, 0.0))
        highlight = 1 + 0.3 * (-(dx + dy) / (math.sqrt(2) * r)).clamp(-1, 1)
        surface = (1 - 0.3 * texture) * highlight  # (B, F, M, M)
        colour = (scene.colour[:, j].view(b, 3, 1, 1, 1) * surface[:, None]).clamp(0, 1)
        video = video + cover[:, None] * (colour - video)
    return video


def _lighting(scene: Scene, tau: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(B, 1, F, M, M) light factor: the gain over time times the turning gradient."""
    b = scene.labels.shape[0]
    a, f, phi, strength, psi0, turn = (scene.light[:, i, None] for i in range(6))
    gain = 1 + a * torch.sin(2 * math.pi * f * tau + phi)  # (B, F)
    psi = psi0 + turn * tau
    sx, sy = s.view(1, 1, 1, -1) - 0.5, s.view(1, 1, -1, 1) - 0.5
    gradient = 1 + strength[..., None, None] * (
        sx * psi.cos()[..., None, None] + sy * psi.sin()[..., None, None]
    )
    return (gain[..., None, None] * gradient).view(b, 1, *gradient.shape[1:])


def render(
    scene: Scene,
    frames: int = FRAMES,
    size: int = SIZE,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Clips (B, 3, ``frames``, ``size``, ``size``) in [-1, 1] of a scene, on ``device``
    (module docstring).

    Raises:
        ValueError: ``frames`` or ``size`` below 1.
    """
    if frames < 1 or size < 1:
        raise ValueError(f"frames and size must be at least 1, got {frames} and {size}")
    scene = scene.to(device)
    m = size * SUPERSAMPLE
    s = (torch.arange(m, device=device, dtype=torch.float32) + 0.5) / m
    tau = (torch.arange(frames, device=device, dtype=torch.float32) + 0.5) / frames
    zoom = torch.exp(scene.zoom[:, None] * (tau - 0.5))  # (B, F)
    video = _background(scene, tau, zoom, s)
    video = _paint_objects(video, scene, tau, zoom, s)
    video = (video * _lighting(scene, tau, s)).clamp(0, 1)
    b = video.shape[0]
    pooled = video.view(b, CHANNELS, frames, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(dim=(4, 6))
    return pooled * 2 - 1


def clips(
    seed: int,
    batch: int,
    device: torch.device | str = "cpu",
    labels: torch.Tensor | None = None,
    *,
    frames: int = FRAMES,
    size: int = SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` clips (B, 3, frames, size, size) in [-1, 1] and their labels (B,) from
    ``seed`` (``scene.draw`` then :func:`render`)."""
    scene = draw(seed, batch, labels)
    return render(scene, frames, size, device), scene.labels.to(device)

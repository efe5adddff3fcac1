r"""Synthetic video-DiT attention: seeded q, k, v on a latent grid with 3D RoPE and head archetypes.

Tokens sit on a latent video grid (T, H, W) in (t, h, w) row-major order, N = T * H * W. For
every head, pre-rotation queries and keys are a sum of parts, and 3D rotary position encoding
(RoPE, as in Wan: the head dim split into t, h, w sections of d - 4 (d // 6), 2 (d // 6) and
2 (d // 6) channels, frequencies theta_j = 10000^(-2j / d_axis)) rotates each channel pair by
``position * theta_j``:

* **positional** part: the same vector u in the high-frequency pairs (theta_j >= 0.05) of q and
  k. After RoPE, ``s q_i . k_j = beta * sum_j w_j cos((p_i - p_j) theta_j)``: a peak at zero
  relative offset. Spatial-local heads put it on the t, h and w pairs, temporal heads on h and
  w only (the same spatial position in every frame attracts).
* **content** part: a "scene" of moving blobs labels every token (nearest of C centres that drift
  linearly over time, shared by all heads); q and k get the head's embedding of their label in
  the low-frequency pairs (theta_j < 0.01, where RoPE barely rotates over the grid), so
  semantic heads attend to the token's own segment wherever it is.
* **sink** part: a few keys (a small random set, mostly in the first frame) share a direction
  that every query also carries: they take a large share of every row's mass.
* **noise**: i.i.d. Gaussian in every channel of q and k: the dense, nearly flat band of tail
  logits around zero (the "narrow band" of the paper's Fig. 3).

Archetypes cycle over heads in the order ``spatial, temporal, semantic, diffuse, sink, mixed``;
each head draws its strengths around the archetype's values from its own generator, so heads
differ (Fig. 1a). A diffuse head has weak structure: a wide distribution whose tail carries much
of the mass. Values are the head's embedding of the content label plus a smooth positional field
plus noise, scaled to unit variance per channel.

Everything is deterministic in ``(seed, head)`` and generated one head at a time
(:meth:`SyntheticSource.head`), so the largest preset needs only one head's q, k, v in memory.
The statistics it is built to match (UTA paper, Sec. 3.4.1 and Fig. 1/3) are measured by the
study's ``anatomy`` experiment and tested in ``tests/test_synthetic.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .presets import PRESETS, Preset

ARCHETYPES = ("spatial", "temporal", "semantic", "diffuse", "sink", "mixed")


# strengths per archetype in logit units at scale 1/sqrt(d): positional peak on the t axis and
# on each of the h and w axes, content (same label), sink, and the noise scale
_STRENGTH = {
    "spatial": (1.5, 1.5, 1.5, 1.0, 0.15),
    "temporal": (0.0, 2.5, 1.5, 1.0, 0.15),
    "semantic": (0.5, 0.5, 6.0, 1.0, 0.15),
    "diffuse": (0.5, 0.5, 1.0, 0.5, 0.5),
    "sink": (0.7, 0.7, 1.0, 8.0, 0.15),
    "mixed": (1.0, 1.0, 3.0, 3.0, 0.2),
}
_CONTENT_CLUSTERS = 12
_SINK_FRACTION = 0.002
_HIGH, _LOW = 0.05, 0.01


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Channels of the t, h, w sections (Wan's split): d - 4 (d // 6), 2 (d // 6), 2 (d // 6)."""
    if head_dim % 2 or head_dim < 12:
        raise ValueError(f"head_dim must be an even number >= 12, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    """(N, 3) int64 (t, h, w) of every token in row-major order."""
    t, h, w = grid
    axes = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)


def rope_angles(grid: tuple[int, int, int], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles (N, d/2) of every channel pair and each pair's (d/2,) frequency theta_j."""
    pos = grid_positions(grid).to(torch.float64)
    angles, thetas = [], []
    for axis, channels in enumerate(rope_sections(head_dim)):
        theta = 10000.0 ** (-torch.arange(channels // 2, dtype=torch.float64) * 2 / channels)
        angles.append(pos[:, axis : axis + 1] * theta)
        thetas.append(theta)
    return torch.cat(angles, dim=-1), torch.cat(thetas)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j + 1) of x (N, d) by ``angles`` (N, d/2)."""
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = even * sin + odd * cos
    return out


def _pair_axis(head_dim: int) -> torch.Tensor:
    """(d/2,) axis (0 t, 1 h, 2 w) of every channel pair."""
    return torch.cat([torch.full((c // 2,), a) for a, c in enumerate(rope_sections(head_dim))])


def scene_labels(grid: tuple[int, int, int], seed: int) -> torch.Tensor:
    """(N,) content label of every token: nearest of C blob centres drifting over time."""
    gen = torch.Generator().manual_seed(seed)
    _, h, w = grid
    start = torch.rand(_CONTENT_CLUSTERS, 2, generator=gen) * torch.tensor([h, w])
    speed = (torch.rand(_CONTENT_CLUSTERS, 2, generator=gen) - 0.5) * 0.6
    pos = grid_positions(grid).to(torch.float32)
    centres = start + speed * pos[:, :1].unsqueeze(-1)  # (N, C, 2)
    dist = ((pos[:, None, 1:] - centres) ** 2).sum(-1)
    return dist.argmin(dim=-1)


@dataclass(frozen=True)
class SyntheticSource:
    """Synthetic video-DiT attention of one preset; :meth:`head` generates one head's q, k, v.

    Attributes:
        preset: name in :data:`PRESETS`.
        seed: the scene and every head derive from it.
        dtype: dtype of the generated tensors.
    """

    preset: str = "small"
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            known = ", ".join(PRESETS)
            raise ValueError(f"unknown synthetic preset {self.preset!r}; known: {known}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    @property
    def spec(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.spec.grid

    @property
    def heads(self) -> int:
        return self.spec.heads

    def archetype(self, head: int) -> str:
        return ARCHETYPES[head % len(ARCHETYPES)]

    def head(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of one head, each (1, 1, N, d), in :attr:`dtype`.

        Logit parts at scale s = 1/sqrt(d) (strength in logit units, each multiplied by a
        per-head factor in [0.75, 1.25]): positional ``beta sum_j w_j cos(dp theta_j)`` with
        w_j proportional to theta_j over the high-frequency pairs of each axis; content
        ``gamma c_a . c_b`` (unit-norm label embeddings); sink ``kappa`` for the sink keys; noise
        of standard deviation ``sigma``.
        """
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < self.heads:
            raise ValueError(f"head must be an integer in [0, {self.heads}), got {head!r}")
        d, grid = self.spec.head_dim, self.grid
        n = self.spec.tokens
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (head + 1))
        jitter = 0.75 + 0.5 * torch.rand(5, generator=gen, dtype=torch.float64)
        beta_t, beta_hw, gamma, kappa, sigma = (
            float(a * b) for a, b in zip(_STRENGTH[self.archetype(head)], jitter, strict=True)
        )
        angles, theta = rope_angles(grid, d)
        axis = _pair_axis(d)
        root = d**0.25  # q.k is scaled by 1/sqrt(d): split sqrt(d) evenly between q and k
        q0 = torch.zeros(n, d, dtype=torch.float64)
        k0 = torch.zeros(n, d, dtype=torch.float64)

        high = theta >= _HIGH
        for ax, beta in ((0, beta_t), (1, beta_hw), (2, beta_hw)):
            pairs = high & (axis == ax)
            weight = theta * pairs
            amplitude = torch.sqrt(beta * weight / weight.sum()) * root
            q0[:, 0::2] += amplitude
            k0[:, 0::2] += amplitude

        low = torch.nonzero(theta < _LOW).squeeze(-1)
        channels = torch.cat([2 * low, 2 * low + 1])
        # orthonormal label embeddings and sink direction: different labels do not attract
        basis = torch.randn(
            channels.numel(), _CONTENT_CLUSTERS + 1, generator=gen, dtype=torch.float64
        )
        basis = torch.linalg.qr(basis).Q.T
        embed, sink_dir = basis[:-1], basis[-1]
        labels = scene_labels(grid, self.seed)
        content = embed[labels] * math.sqrt(gamma) * root
        q0[:, channels] += content
        k0[:, channels] += content
        n_sink = max(1, round(_SINK_FRACTION * n))
        frame = math.prod(grid[1:])
        sinks = torch.randperm(min(n, 4 * frame), generator=gen)[:n_sink]
        q0[:, channels] += sink_dir * math.sqrt(kappa) * root
        k0[sinks[:, None], channels] += sink_dir * math.sqrt(kappa) * root

        noise = math.sqrt(sigma) * root / d**0.25
        q0 += noise * torch.randn(n, d, generator=gen, dtype=torch.float64)
        k0 += noise * torch.randn(n, d, generator=gen, dtype=torch.float64)
        q, k = apply_rope(q0, angles), apply_rope(k0, angles)

        value_embed = torch.randn(_CONTENT_CLUSTERS, d, generator=gen, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(d, generator=gen, dtype=torch.float64)
        freq = torch.randn(3, d, generator=gen, dtype=torch.float64) * 0.15
        field = torch.sin(grid_positions(grid).to(torch.float64) @ freq + phase)
        v = (
            value_embed[labels]
            + field
            + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        )
        v = (v - v.mean(0)) / v.std(0)
        return tuple(x.to(self.dtype).view(1, 1, n, d) for x in (q, k, v))  # type: ignore[return-value]

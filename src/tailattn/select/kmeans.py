r"""k-means over the tokens of every (batch, head): SVG2's clustering (:mod:`.svg2`).

Lloyd's algorithm, batched over (batch, head), in PyTorch on any device:

    labels_i = argmin_c ||x_i - mu_c||^2 = argmin_c (||mu_c||^2 - 2 x_i . mu_c)
    mu_c     = mean of the x_i with labels_i = c        (an empty cluster keeps its centroid)

Cluster sums never use floating-point atomics, so a run is bitwise reproducible on its device:
on CPU a sequential ``index_add_``, elsewhere a stable sort by label and the difference of a
float64 prefix sum at each cluster's end and start. Initial centroids are distinct tokens drawn
with a seeded CPU generator, the same on every device. :func:`cluster_permutation` makes each
cluster contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import accumulation_dtype, check_positive
from ..permute import permute_tokens

ASSIGN_CHUNK_BYTES = 32 * 2**20
"""Bytes of one (B*H, rows, C) block of distances during the assignment step."""


def cluster_permutation(labels: torch.Tensor) -> torch.Tensor:
    """Stable sort of the tokens by cluster label, (B, H, N) -> (B, H, N) int64.

    Each cluster becomes contiguous, clusters in ascending label order, and tokens inside a
    cluster keep their original (spatio-temporal) order.
    """
    return torch.argsort(labels, dim=-1, stable=True)


@dataclass(frozen=True)
class KMeansResult:
    """Centroids (B, H, C, D) in the accumulation dtype, labels (B, H, N) int64 in [0, C), and
    cluster sizes (B, H, C) int64 (sizes sum to N)."""

    centroids: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor


def assign_clusters(
    x: torch.Tensor, centroids: torch.Tensor, chunk_bytes: int = ASSIGN_CHUNK_BYTES
) -> torch.Tensor:
    """Nearest centroid of every token: (B, H, N, D), (B, H, C, D) -> labels (B, H, N) int64.

    Ties go to the lowest cluster id. Streams over token chunks: memory O(chunk * C).
    """
    b, h, n, d = x.shape
    c = centroids.shape[2]
    flat_x = x.to(centroids.dtype).reshape(b * h, n, d)
    flat_c = centroids.reshape(b * h, c, d)
    norms = (flat_c * flat_c).sum(-1).unsqueeze(1)  # (B*H, 1, C)
    per_row = b * h * c * torch.finfo(centroids.dtype).bits // 8
    step = max(1, chunk_bytes // per_row)
    labels = torch.empty(b * h, n, dtype=torch.int64, device=x.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        dist = torch.baddbmm(norms, flat_x[:, rows], flat_c.mT, alpha=-2.0)
        labels[:, rows] = dist.argmin(dim=-1)
    return labels.view(b, h, n)


def cluster_sizes(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Members of every cluster, (B, H, N) labels -> (B, H, C) int64 (integer adds: exact)."""
    sizes = labels.new_zeros(*labels.shape[:2], n_clusters)
    return sizes.scatter_add_(-1, labels, torch.ones_like(labels))


def cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, n_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (B, H, C, D) in x's dtype and sizes (B, H, C) int64, deterministically.

    CPU: a sequential ``index_add_`` (deterministic there); other devices:
    :func:`prefix_cluster_sums` (no atomics).
    """
    if x.device.type != "cpu":
        return prefix_cluster_sums(x, labels, n_clusters)
    b, h, n, d = x.shape
    offsets = torch.arange(b * h, device=x.device).view(b, h, 1) * n_clusters
    sums = x.new_zeros(b * h * n_clusters, d)
    sums.index_add_(0, (labels + offsets).flatten(), x.reshape(b * h * n, d))
    return sums.view(b, h, n_clusters, d), cluster_sizes(labels, n_clusters)


def prefix_cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, n_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cluster_sums` by sorting: the difference of a float64 prefix sum over the tokens
    sorted by label, at each cluster's end and start (same result on every run and device)."""
    b, h, _, d = x.shape
    sizes = cluster_sizes(labels, n_clusters)
    ordered = permute_tokens(x, cluster_permutation(labels)).to(torch.float64)
    prefix = torch.cat([ordered.new_zeros(b, h, 1, d), ordered.cumsum(dim=2)], dim=2)
    ends = sizes.cumsum(dim=-1)
    starts = ends - sizes

    def at(pos: torch.Tensor) -> torch.Tensor:
        return prefix.gather(2, pos.unsqueeze(-1).expand(b, h, n_clusters, d))

    return (at(ends) - at(starts)).to(x.dtype), sizes


def initial_centroids(x: torch.Tensor, n_clusters: int, seed: int) -> torch.Tensor:
    """``n_clusters`` distinct tokens of each (batch, head), drawn with a seeded CPU generator."""
    b, h, n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(b, h, n, generator=gen).argsort(dim=-1)[..., :n_clusters]
    acc = accumulation_dtype(x.dtype)
    return x.gather(2, picks.to(x.device).unsqueeze(-1).expand(b, h, n_clusters, d)).to(acc)


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    iterations: int,
    *,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> KMeansResult:
    """Batched k-means over the token axis of x (B, H, N, D), one clustering per (batch, head).

    Args:
        x: points, any float dtype; computed in float32 (float64 for float64 input).
        n_clusters: C, 1 <= C <= N.
        iterations: Lloyd updates (assign, then move each centroid to its cluster's mean); the
            returned labels are a final assignment to the returned centroids.
        seed: seed of the initial centroids (ignored with ``init``).
        init: (B, H, C, D) starting centroids (warm start), e.g. the previous call's.

    Returns:
        A :class:`KMeansResult`; identical for identical inputs and seed, on every device.
    """
    n_clusters = int(check_positive(n_clusters, "n_clusters", integer=True))
    iterations = int(check_positive(iterations, "iterations", integer=True))
    b, h, n, d = x.shape
    if n_clusters > n:
        raise ValueError(f"n_clusters must be at most the number of tokens {n}, got {n_clusters}")
    acc = accumulation_dtype(x.dtype)
    if init is None:
        centroids = initial_centroids(x, n_clusters, seed)
    else:
        if tuple(init.shape) != (b, h, n_clusters, d):
            raise ValueError(
                f"init must have shape {(b, h, n_clusters, d)} (B, H, C, D), "
                f"got {tuple(init.shape)}"
            )
        centroids = init.to(device=x.device, dtype=acc)
    x_acc = x.to(acc)
    for _ in range(iterations):
        labels = assign_clusters(x_acc, centroids)
        sums, sizes = cluster_sums(x_acc, labels, n_clusters)
        means = sums / sizes.clamp_min(1).unsqueeze(-1).to(acc)
        centroids = torch.where((sizes > 0).unsqueeze(-1), means, centroids)
    labels = assign_clusters(x_acc, centroids)
    return KMeansResult(centroids, labels, cluster_sizes(labels, n_clusters))

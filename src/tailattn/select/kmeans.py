r"""k-means over the tokens of every (batch, head): SVG2's clustering (:mod:`.svg2`).

Lloyd's algorithm, one clustering per (batch, head), batched:

    labels_i = argmin_c ||x_i - mu_c||^2 = argmin_c (||mu_c||^2 - 2 x_i . mu_c)   (ties: lowest c)
    mu_c     = mean of the x_i with labels_i = c        (an empty cluster keeps its centroid)

``iterations`` such steps, then a final assignment to the returned centroids with its cluster
sizes and :func:`cluster_permutation` (the stable sort of the tokens by label, which makes every
cluster contiguous).

Initial centroids (ours): stratified tokens. The N tokens are cut into C strata
``[floor(c N / C), floor((c + 1) N / C))`` and centroid c starts at the token of stratum c at
offset ``mix32(seed, c) mod (stratum length)`` (a 32-bit integer hash). The C tokens are distinct,
spread over the whole (t, h, w) sequence, and depend on (N, C, seed) only: every (batch, head)
starts from the same positions of its own tokens, so its clustering does not depend on where it
sits in the batch (issue 13), and the positions are integer tensor ops on x's device (no host
random generator, no copy to the device).

Two paths, chosen per call by ``backend`` (no global switch), equal on well-separated data:

* ``"triton"``: :mod:`tailattn.kernels.kmeans`, four launches per Lloyd step, integer
  histograms and a counting sort instead of atomics, float32 segment sums; no host-device
  synchronization and no float64, so it runs under ``torch.cuda.set_sync_debug_mode("error")``
  and inside CUDA-graph capture. The default for CUDA tensors in float16, bfloat16 or float32
  with a head dim up to 256; in the CPU interpreter (``TRITON_INTERPRET=1``) when asked for.
* ``"reference"``: PyTorch on any device, in float32 (float64 for float64 input): assignment by
  chunked ``baddbmm`` + argmin, cluster sums by a sequential ``index_add_`` on CPU and by the
  difference of a float64 prefix sum over the label-sorted tokens elsewhere. The default
  otherwise.

Both are bitwise reproducible on a given device: same input and seed, same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import accumulation_dtype, check_positive
from ..permute import permute_tokens

ASSIGN_CHUNK_BYTES = 32 * 2**20
"""Bytes of one (B*H, rows, C) block of distances during the reference assignment step."""

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9
_MIX32 = 0x045D9F3B  # < 2^31: products of 32-bit values stay inside int64


def cluster_permutation(labels: torch.Tensor) -> torch.Tensor:
    """Stable sort of the tokens by cluster label, (B, H, N) -> (B, H, N) int64.

    Each cluster becomes contiguous, clusters in ascending label order, and tokens inside a
    cluster keep their original (spatio-temporal) order.
    """
    return torch.argsort(labels, dim=-1, stable=True)


@dataclass(frozen=True)
class KMeansResult:
    """Centroids (B, H, C, D) in the accumulation dtype, labels (B, H, N) int64 in [0, C),
    cluster sizes (B, H, C) int64 (sizes sum to N), and ``perm`` (B, H, N) int64, the
    :func:`cluster_permutation` of the labels."""

    centroids: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor
    perm: torch.Tensor


def assign_clusters(
    x: torch.Tensor, centroids: torch.Tensor, chunk_bytes: int = ASSIGN_CHUNK_BYTES
) -> torch.Tensor:
    """Nearest centroid of every token: (B, H, N, D), (B, H, C, D) -> labels (B, H, N) int64.

    The reference assignment (PyTorch, centroids' dtype). Ties go to the lowest cluster id.
    Streams over token chunks: memory O(chunk * C).
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

    The reference: a sequential ``index_add_`` on CPU (deterministic there), on other devices
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
    sorted by label, at each cluster's end and start (same result on every run)."""
    b, h, _, d = x.shape
    sizes = cluster_sizes(labels, n_clusters)
    ordered = permute_tokens(x, cluster_permutation(labels)).to(torch.float64)
    prefix = torch.cat([ordered.new_zeros(b, h, 1, d), ordered.cumsum(dim=2)], dim=2)
    ends = sizes.cumsum(dim=-1)
    starts = ends - sizes

    def at(pos: torch.Tensor) -> torch.Tensor:
        return prefix.gather(2, pos.unsqueeze(-1).expand(b, h, n_clusters, d))

    return (at(ends) - at(starts)).to(x.dtype), sizes


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32) (xor-shift-multiply, twice)."""
    x = ((x ^ (x >> 16)) * _MIX32) & _MASK32
    x = ((x ^ (x >> 16)) * _MIX32) & _MASK32
    return x ^ (x >> 16)


def initial_positions(
    n_tokens: int, n_clusters: int, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Token index of every initial centroid, (C,) int64: one token per stratum
    ``[floor(c N / C), floor((c + 1) N / C))`` at a seeded hash offset (module docstring)."""
    c = torch.arange(n_clusters, dtype=torch.int64, device=device)
    low = c * n_tokens // n_clusters
    width = (c + 1) * n_tokens // n_clusters - low
    key = (c + ((seed & _MASK32) * _GOLDEN32 & _MASK32)) & _MASK32
    return low + _mix32(key) % width


def initial_centroids(x: torch.Tensor, n_clusters: int, seed: int) -> torch.Tensor:
    """The stratified starting centroids of every (batch, head), (B, H, C, D) in the
    accumulation dtype: the same token positions for every (batch, head)."""
    b, h, n, d = x.shape
    picks = initial_positions(n, n_clusters, seed, x.device)
    index = picks.view(1, 1, n_clusters, 1).expand(b, h, n_clusters, d)
    return x.gather(2, index).to(accumulation_dtype(x.dtype))


def triton_unsupported(x: torch.Tensor) -> str | None:
    """Why the Triton k-means cannot take x (``None`` when it can), on CUDA or in the
    interpreter (platform checks: :func:`tailattn.execute.choose_kernel`)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x is {x.dtype}; the kernels take float16, bfloat16 and float32"
    from ..kernels.kmeans import MAX_HEAD_DIM
    from ..kernels.runtime import interpreter_problem

    problem = interpreter_problem()
    if problem is not None:
        return problem
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"the head dim {x.shape[-1]} is above {MAX_HEAD_DIM}"
    return None


def use_triton(x: torch.Tensor, backend: str | None) -> bool:
    """The dispatcher: whether k-means of x runs on the Triton kernels
    (:func:`tailattn.execute.choose_kernel`: ``None`` takes them for CUDA tensors they support;
    ``"triton"`` insists, a ValueError says why it cannot; ``"reference"`` never takes them)."""
    from ..execute import choose_kernel

    return choose_kernel(backend, (x,), lambda: triton_unsupported(x), what="k-means")


def _lloyd_reference(x: torch.Tensor, centroids: torch.Tensor, iterations: int) -> KMeansResult:
    n_clusters = centroids.shape[2]
    x_acc = x.to(centroids.dtype)
    for _ in range(iterations):
        labels = assign_clusters(x_acc, centroids)
        sums, sizes = cluster_sums(x_acc, labels, n_clusters)
        means = sums / sizes.clamp_min(1).unsqueeze(-1).to(centroids.dtype)
        centroids = torch.where((sizes > 0).unsqueeze(-1), means, centroids)
    labels = assign_clusters(x_acc, centroids)
    sizes = cluster_sizes(labels, n_clusters)
    return KMeansResult(centroids, labels, sizes, cluster_permutation(labels))


def _lloyd_triton(x: torch.Tensor, centroids: torch.Tensor, iterations: int) -> KMeansResult:
    from ..kernels import kmeans as kk

    x = x if x.stride(-1) == 1 else x.contiguous()  # once, not in every launch
    state = kk.prepare(centroids, x.dtype)
    for _ in range(iterations):
        state = kk.update(x, kk.assign_and_sort(x, state, torch.int32), state)
    final = kk.assign_and_sort(x, state, torch.int64)
    return KMeansResult(state.values, final.labels, kk.cluster_sizes(final), final.perm)


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    iterations: int,
    *,
    seed: int = 0,
    init: torch.Tensor | None = None,
    backend: str | None = None,
) -> KMeansResult:
    """Batched k-means over the token axis of x (B, H, N, D), one clustering per (batch, head).

    Args:
        x: points, any float dtype; computed in float32 (float64 for float64 input; the
            Triton path rounds the distance dot as :mod:`tailattn.kernels.kmeans` says).
        n_clusters: C, 1 <= C <= N.
        iterations: Lloyd updates (assign, then move each centroid to its cluster's mean); the
            returned labels are a final assignment to the returned centroids.
        seed: seed of the stratified initial centroids (ignored with ``init``).
        init: (B, H, C, D) starting centroids (warm start), e.g. the previous call's.
        backend: ``None`` (Triton kernels on CUDA, the reference elsewhere), ``"triton"`` or
            ``"reference"`` (module docstring).

    Returns:
        A :class:`KMeansResult`, identical for identical inputs and seed on a given device;
        each (batch, head)'s part depends on that (batch, head)'s tokens only.
    """
    n_clusters = int(check_positive(n_clusters, "n_clusters", integer=True))
    iterations = int(check_positive(iterations, "iterations", integer=True))
    b, h, n, d = x.shape
    if n_clusters > n:
        raise ValueError(f"n_clusters must be at most the number of tokens {n}, got {n_clusters}")
    if init is None:
        centroids = initial_centroids(x, n_clusters, seed)
    elif tuple(init.shape) != (b, h, n_clusters, d):
        raise ValueError(
            f"init must have shape {(b, h, n_clusters, d)} (B, H, C, D), got {tuple(init.shape)}"
        )
    else:
        centroids = init.to(device=x.device, dtype=accumulation_dtype(x.dtype))
    if use_triton(x, backend):
        return _lloyd_triton(x, centroids, iterations)
    return _lloyd_reference(x, centroids, iterations)

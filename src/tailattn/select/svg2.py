r"""SVG2 (Sparse VideoGen2): semantic-aware permutation by k-means, cluster-pair top-p.

1. k-means on the queries and, separately, on the keys of every (batch, head)
   (:func:`tailattn.select.kmeans.kmeans`): ``iterations`` (50) Lloyd steps on the first call,
   then ``warm_iterations`` (2) steps from the previous call's centroids when an
   :class:`SVG2State` is passed (``state=``); nothing is kept between calls otherwise.
2. Permute queries and keys so that every cluster is contiguous (stable sort by label).
3. Cluster-pair mass: query cluster a, key cluster b with centroids c_a, c_b and size n_b,

       P_ab = softmax_b(s c_a . c_b + log n_b).

4. Selection, two modes:

   * ``keep=None`` (SVG2's own rule): per query cluster, key clusters in descending P_ab until
     the cumulative mass reaches ``top_p`` (0.9), at least ``ceil(min_kc_ratio * Ck)`` (10 %).
   * ``keep=x`` (the project's budget knob, as Table 1 compares SVG2 at keep 0.1..0.5): exactly
     ``ceil(keep * Mk)`` key blocks per query block, ranked by the block-projected mass below.

Clusters onto blocks (an approximation, ours). SVG2 runs a kernel over variable-size cluster
blocks; here the permuted sequences are cut into fixed blocks of ``block_q`` x ``block_k``
tokens, so a block may hold several small clusters or part of a large one. With
``W_ma`` = share of query block m's queries in cluster a and ``U_jb`` = share of cluster b's
keys in key block j:

* top-p mode keeps block pair (m, j) when any of its token pairs belongs to a selected cluster
  pair: a superset of SVG2's selection, so the density is at least SVG2's own;
* budget mode ranks key blocks by ``S_mj = sum_ab W_ma P_ab U_jb`` (the cluster-pair mass
  spread evenly over each cluster's keys, averaged over the block's queries).

Speed and determinism: on CUDA the k-means runs on the Triton kernels
(:mod:`tailattn.kernels.kmeans`; ``kmeans_backend`` picks the path) and the rest is a fixed
sequence of tensor ops of static shapes, so the whole selection never synchronizes with the
host and can be captured in a CUDA graph. Both layouts are correct by construction and built
without validation syncs: in top-p mode every query block holds a query cluster whose top key
cluster is non-empty (>= 1 kept key block), in budget mode every row keeps ``ceil(keep * Mk)``
distinct ids. Every (batch, head) is computed from its own q and k only (the initial centroids
too), so identical batch items get bitwise identical layouts; same input, same layout.

Cluster counts: the paper's 300 query / 1000 key clusters are for Wan 720p (N = 75,600); by
default they scale with N at the same tokens per cluster (ours), at least min(N, 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_fraction, check_positive
from ..execute import BACKENDS
from ..layout import BlockLayout, num_blocks
from ..methods import registry
from .blocks import block_budget, check_block_size, top_mass_counts
from .kmeans import KMeansResult, kmeans

WAN720P_TOKENS = 75_600
WAN720P_Q_CLUSTERS = 300
WAN720P_K_CLUSTERS = 1000
MIN_CLUSTERS = 8


def default_clusters(n_tokens: int, at_wan720p: int) -> int:
    """``ceil(at_wan720p * n / 75,600)``, at least min(n, 8) and at most n."""
    scaled = math.ceil(at_wan720p * n_tokens / WAN720P_TOKENS)
    return min(n_tokens, max(MIN_CLUSTERS, scaled))


@dataclass
class SVG2State:
    """Centroids carried from one call to the next (one state per attention layer).

    Pass the same object as ``state=`` on every call of one layer; the first call clusters from
    scratch and fills it, later calls warm-start from it and update it in place.
    """

    q_centroids: torch.Tensor | None = None
    k_centroids: torch.Tensor | None = None
    calls: int = 0


def _check_state(state: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if state is None:
        return None
    centroids = getattr(state, name)
    if centroids is not None and tuple(centroids.shape) != shape:
        raise ValueError(
            f"state.{name} has shape {tuple(centroids.shape)} but this call needs {shape} "
            f"(B, H, clusters, D); use one SVG2State per attention layer"
        )
    return centroids


def block_cluster_counts(
    labels: torch.Tensor, perm: torch.Tensor, n_clusters: int, block: int
) -> torch.Tensor:
    """Tokens of each cluster in each block of the permuted sequence, (B, H, M, C) int64."""
    b, h, n = labels.shape
    m = num_blocks(n, block)
    ordered = labels.gather(-1, perm)
    slot = torch.arange(n, device=labels.device) // block * n_clusters + ordered
    counts = torch.zeros(b, h, m * n_clusters, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(-1, slot, torch.ones_like(slot))
    return counts.view(b, h, m, n_clusters)


def cluster_pair_mass(q_km: KMeansResult, k_km: KMeansResult, scale: float) -> torch.Tensor:
    """``P_ab = softmax_b(s c_a . c_b + log n_b)``, (B, H, Cq, Ck); empty key clusters get 0."""
    logits = scale * torch.matmul(q_km.centroids, k_km.centroids.transpose(-1, -2))
    log_size = torch.log(k_km.sizes.to(logits.dtype)).unsqueeze(-2)  # log 0 = -inf
    return torch.softmax(logits + log_size, dim=-1)


@registry.selection("svg2", granularity="block", summary="k-means permutation, cluster top-p")
@dataclass(frozen=True)
class SVG2:
    """SVG2: k-means clusters of q and k, cluster-pair top-p (or a block budget ``keep``)."""

    keep: float | None = None
    top_p: float = 0.9
    min_kc_ratio: float = 0.10
    q_clusters: int | None = None
    k_clusters: int | None = None
    iterations: int = 50
    warm_iterations: int = 2
    seed: int = 0
    block_q: int = 128
    block_k: int = 128
    kmeans_backend: str | None = None

    def __post_init__(self) -> None:
        if self.kmeans_backend not in BACKENDS:
            raise ValueError(
                f"kmeans_backend must be one of {BACKENDS}, got {self.kmeans_backend!r}"
            )
        if self.keep is not None:
            check_fraction(self.keep, "keep")
        check_fraction(self.top_p, "top_p")
        ratio = self.min_kc_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"min_kc_ratio must be a number in [0, 1], got {ratio!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"min_kc_ratio must be in [0, 1], got {ratio}")
        for name in ("q_clusters", "k_clusters"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name, integer=True)
        check_positive(self.iterations, "iterations", integer=True)
        check_positive(self.warm_iterations, "warm_iterations", integer=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def clusters(self, n_q: int, n_k: int) -> tuple[int, int]:
        """Query and key cluster counts for these lengths (given ones are capped at N)."""
        cq = self.q_clusters or default_clusters(n_q, WAN720P_Q_CLUSTERS)
        ck = self.k_clusters or default_clusters(n_k, WAN720P_K_CLUSTERS)
        return min(cq, n_q), min(ck, n_k)

    def new_state(self) -> SVG2State:
        """A fresh per-layer state (the diffusers integration asks for one per layer)."""
        return SVG2State()

    def cluster(
        self, q: torch.Tensor, k: torch.Tensor, state: SVG2State | None = None
    ) -> tuple[KMeansResult, KMeansResult]:
        """k-means of q and k, warm-started from (and written back to) ``state`` when given."""
        if state is not None and not isinstance(state, SVG2State):
            raise TypeError(f"state must be an SVG2State or None, got {type(state).__name__}")
        b, h, n_q, d = q.shape
        cq, ck = self.clusters(n_q, k.shape[2])
        init_q = _check_state(state, "q_centroids", (b, h, cq, d))
        init_k = _check_state(state, "k_centroids", (b, h, ck, d))
        results = []
        for x, n_clusters, init in ((q, cq, init_q), (k, ck, init_k)):
            steps = self.iterations if init is None else self.warm_iterations
            results.append(
                kmeans(x, n_clusters, steps, seed=self.seed, init=init, backend=self.kmeans_backend)
            )
        q_km, k_km = results
        if state is not None:
            state.q_centroids, state.k_centroids = q_km.centroids, k_km.centroids
            state.calls += 1
        return q_km, k_km

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: SVG2State | None = None,
    ) -> BlockLayout:
        q_km, k_km = self.cluster(q, k, state)
        n_q, n_k = q.shape[2], k.shape[2]
        cq, ck = q_km.sizes.shape[-1], k_km.sizes.shape[-1]
        q_counts = block_cluster_counts(q_km.labels, q_km.perm, cq, self.block_q)
        k_counts = block_cluster_counts(k_km.labels, k_km.perm, ck, self.block_k)
        mass = cluster_pair_mass(q_km, k_km, scale)
        if self.keep is None:
            probs, order = mass.sort(dim=-1, descending=True, stable=True)
            counts = top_mass_counts(probs, self.top_p, math.ceil(self.min_kc_ratio * ck - 1e-9))
            chosen = torch.arange(ck, device=mass.device) < counts.unsqueeze(-1)
            selected = torch.zeros_like(chosen).scatter_(-1, order, chosen).to(mass.dtype)
            hits = (q_counts > 0).to(mass.dtype) @ selected @ (k_counts > 0).to(mass.dtype).mT
            # >= 1 kept block per row by construction (module docstring): no validation sync
            return BlockLayout.from_dense(
                hits > 0, n_q, n_k, self.block_q, self.block_k, q_km.perm, k_km.perm, check=False
            )
        q_share = q_counts.to(mass.dtype) / q_counts.sum(-1, keepdim=True).to(mass.dtype)
        k_share = k_counts.to(mass.dtype) / k_km.sizes.clamp_min(1).unsqueeze(-2).to(mass.dtype)
        block_mass = (q_share @ mass) @ k_share.mT
        budget = block_budget(self.keep, block_mass.shape[-1])
        kept = block_mass.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values
        counts = torch.full(kept.shape[:3], budget, dtype=torch.int32, device=kept.device)
        # distinct, in-range ids and a full count by construction: no validation sync
        return BlockLayout(
            kept.to(torch.int32),
            counts,
            n_q,
            n_k,
            self.block_q,
            self.block_k,
            q_km.perm,
            k_km.perm,
            check=False,
        )

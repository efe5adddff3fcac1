r"""Error-aware block selection ``block-err``: keep the key blocks the tail would get wrong.

Block selections see q and k only (:class:`~tailattn.contract.BlockSelection`), so the error
is estimated from the keys. Tokens (after an optional reordering, ``order``) are cut into query
blocks m of ``block_q`` and key blocks j of ``block_k`` tokens (n_j in the last one).

**Probe.** Each query block is represented by its mean query qhat_m, but unlike pooled scoring
(:mod:`tailattn.select.blocks`), which also pools the keys, the probe is scored against every
key: z_t = s qhat_m . k_t. Per key block (exact for the probe, any logit spread inside a block)

    p_mj   = sum_{t in j} e^{z_t} / sum_t e^{z_t}               (block mass)
    kap_mj = sum_{t in j} e^{z_t} k_t / sum_{t in j} e^{z_t}    (attention-weighted mean key)
    d_mj   = p_mj (kap_mj - K_m),   K_m = sum_j p_mj kap_mj     (block imbalance; sum_j d_mj = 0)

A lognormal block (logits N(zbar, sigma^2)) has ``log p = zbar + log n + sigma^2 / 2 - lse``:
the probe contains the second-moment correction s^2 qhat^T Cov_j(k) qhat of the issue and every
higher one, at the cost of one product qhat K^T (1 / block_q of dense QK). ``kap`` is kept as a
seeded Gaussian sketch of ``sketch`` dimensions (JL: squared norms are kept in expectation).

**Tail error of a dropped block.** References are to the UTA paper (seed 001). A block tail
gives every dropped key of block j one implied logit zhat_j (``drop``: -inf, the Top-K
renormalization of Eq. 5-6; ``blocks``: s qhat . kbar_j; ``uta``: the mean dropped logit of
Eq. 10 and 13, here s qhat . kbar over all keys, since at least 1 - keep of the keys are
dropped). With a_mj = n_j e^{zhat_j} / sum_t e^{z_t}, the exact output O of the probe and
p_j, mu_j the block's mass and attention-weighted value, splitting Eq. 7 into kept and dropped
blocks and subtracting the tail's output (Eq. 14 for ``uta``) gives exactly

    O_tail - O = sum_{j in D} e_j / (sum_{j in T} p_j + sum_{j in D} a_j),
    e_j = (a_j - p_j)(vbar_j - O) - p_j (mu_j - vbar_j)

(the mass misweighting of the block times its value offset, plus the block's own value
spread). For ``drop`` (a_j = 0) it is Eq. 6 grouped by blocks; Theorem 3.1 (Eq. 8-9) per
block: equal logits in block j make a_j = p_j (``blocks``) and mu_j = vbar_j, so e_j = 0.

**Tails: ranked.** Values are not seen: taking both value terms of the same unknown size
sigma_v for every block and uncorrelated (the queries of a block weigh its keys less evenly
than their mean does, so the probe's own within-block weights do not tell the second one),

    E |e_j|^2 / sigma_v^2 ~ (p_j - a_j)^2 + p_j^2

(``uta``, ``blocks``; ``moment`` is scored as ``uta``), and ``rank`` keeps the blocks of
largest score.

**Drop: a set function.** For ``drop`` the error does not add up block by block:
``O_T - O = sum_{t in T} p_t (v_t - O) / r_T``, which vanishes when the kept blocks' weighted
values average to O. With values a linear map of the keys plus noise, the kept set should
balance the keys: minimise, greedily from the empty set,

    J(T) = (|sum_{j in T} d_j|^2 + kappa sum_{j not in T} |d_j|^2) / (sum_{j in T} p_j)^2,

where the kappa term stands for what the probe does not see (each query's own imbalance of
the dropped blocks, modelled as independent with variance kappa |d_j|^2). ``search`` is
``greedy`` for ``drop`` and ``rank`` for the tails.

**Budget.** ``fixed``: ceil(keep * Mk) blocks per query block. ``adaptive``: the same total
over the query blocks of a head, each keeping at least one: per query block a curve of gains
(rank: the sorted scores; greedy: the decrease of J per step, run to 2 ceil(keep * Mk) steps,
made non-increasing), and the largest gains over all query blocks win. Nothing synchronizes
with the host; layouts are valid by construction (``check=False``).

**Cost** at Wan2.1-1.3B 480p (B=1, H=12, N=32,760, D=128, 256 x 256 blocks; docs/methods.md
counts it in full): the probe product qhat K^T, 2 Mq N D H = 25.8 GFLOP, for every mode; for
``drop`` also the sketched mean keys (19.3 GFLOP at r=32), 101 MB of sketches written and read
back and ceil(keep * Mk) greedy steps of O(C r) per query block, over the C = max(``candidates``,
4 steps) key blocks of largest p_mj (all Mk when C >= Mk; J still sums over every block: the
others stay dropped). On CUDA both run as Triton kernels (:mod:`tailattn.kernels.error_scoring`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import (
    accumulation_dtype,
    check_fraction,
    check_grid,
    check_positive,
    triton_installed,
)
from ..layout import BlockLayout, block_sizes, num_blocks, to_blocks
from ..methods import registry
from ..permute import permute_tokens
from .blocks import block_budget, check_block_size, layout_from_ranking, pool_blocks
from .curves import grid_order
from .svg2 import SVG2, SVG2State

FOR_TAILS = ("drop", "uta", "blocks", "moment")
ORDERS = ("none", "gilbert", "hilbert", "svg2")
BUDGETS = ("fixed", "adaptive")
PROBE_CHUNK_BYTES = 64 * 2**20
"""Bytes of one chunk of probe logits (probes x keys) on the PyTorch path."""


@dataclass(frozen=True)
class Probe:
    """Probe statistics of every (query block m, key block j), (B, H, Mq, Mk[, r]).

    ``log_mass``: log sum_{t in j} e^{z_t} (unnormalized); ``key_sketch``: kap_mj sketched (keys
    centered on their mean first), or ``None`` when not asked for.
    """

    log_mass: torch.Tensor
    key_sketch: torch.Tensor | None = None

    def mass(self) -> torch.Tensor:
        """p_mj, the share of each key block in the probe's total mass."""
        return torch.softmax(self.log_mass, dim=-1)


@functools.cache
def _sketch_matrix(d: int, r: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    if r >= d:
        return torch.eye(d, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(d * 7919 + r)
    matrix = torch.randn(d, r, generator=gen, dtype=torch.float64) / math.sqrt(r)
    return matrix.to(device=device, dtype=dtype)


def sketch_matrix(d: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(d, r) seeded Gaussian matrix / sqrt(r); the identity when r >= d (no sketch). Cached
    per device: made, and copied to a GPU, once."""
    return _sketch_matrix(d, r, dtype, str(device))


def probe_stats_torch(
    qhat: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    block_k: int,
    sketch: torch.Tensor | None,
    chunk_bytes: int = PROBE_CHUNK_BYTES,
) -> Probe:
    """:class:`Probe` in PyTorch (any device), streamed over chunks of probes.

    Args:
        qhat: (B, H, Mq, D) probe queries; k: (B, H, N, D) keys (both in the accumulation dtype).
        sketch: (D, r) or ``None`` (no mean keys).
    """
    b, h, mq, _ = qhat.shape
    kb = to_blocks(k, block_k)  # (B, H, Mk, bk, D), zero-padded
    mk = kb.shape[2]
    real = (torch.arange(mk * block_k, device=k.device) < k.shape[2]).view(mk, block_k)
    keys = None
    if sketch is not None:
        shift = k.mean(dim=2, keepdim=True).unsqueeze(2)
        keys = (kb - shift) @ sketch  # (B, H, Mk, bk, r)
    log_mass, sketches = [], []
    step = max(1, chunk_bytes // max(1, b * h * mk * block_k * qhat.element_size() * 2))
    for start in range(0, mq, step):
        probes = qhat[:, :, start : start + step]
        z = scale * torch.einsum("bhcd,bhjtd->bhcjt", probes, kb)
        z = z.masked_fill(~real, float("-inf"))
        lse = torch.logsumexp(z, dim=-1)
        log_mass.append(lse)
        if keys is not None:
            weights = torch.exp(z - lse.unsqueeze(-1))
            sketches.append(torch.einsum("bhcjt,bhjtr->bhcjr", weights, keys))
    return Probe(torch.cat(log_mass, 2), torch.cat(sketches, 2) if keys is not None else None)


def _triton_sizes(k: torch.Tensor, *sizes: int) -> bool:
    """The Triton scoring kernels serve CUDA tensors of power-of-two sizes >= 16."""
    if k.device.type != "cuda" or k.dtype == torch.float64:
        return False
    return all(x >= 16 and not x & (x - 1) for x in sizes) and triton_installed()


def probe_stats(
    qhat: torch.Tensor, k: torch.Tensor, scale: float, block_k: int, r: int | None
) -> Probe:
    """Probe statistics of (B, H, Mq, D) probes against (B, H, N, D) keys (module docstring);
    ``r`` sketch dimensions of the mean keys, ``None`` for masses only. Triton on CUDA,
    PyTorch elsewhere."""
    d = k.shape[-1]
    width = None if r is None else min(r, d)
    if _triton_sizes(k, d, block_k, *(() if width is None else (width,))):
        from ..kernels.error_scoring import probe_stats as kernel

        sketch = None if width is None else sketch_matrix(d, width, torch.float32, k.device)
        return Probe(*kernel(qhat, k, scale, block_k, sketch))
    acc = accumulation_dtype(k.dtype)
    sketch = None if width is None else sketch_matrix(d, width, acc, k.device)
    return probe_stats_torch(qhat.to(acc), k.to(acc), scale, block_k, sketch)


def tail_log_mass(
    qhat: torch.Tensor, k: torch.Tensor, scale: float, block_k: int, for_tail: str
) -> torch.Tensor:
    """log(n_j e^{zhat_mj}), the mass the tail gives key block j, unnormalized (module
    docstring), (B, H, Mq, Mk); -inf for ``drop``."""
    if for_tail == "drop":
        return qhat.new_full((*qhat.shape[:3], num_blocks(k.shape[2], block_k)), float("-inf"))
    log_count = torch.log(block_sizes(k.shape[2], block_k, k.device).to(qhat.dtype))
    if for_tail == "blocks":  # the pooled keys only here: pooling k is a pass over all keys
        kbar = pool_blocks(k, block_k).to(qhat.dtype)
        return scale * qhat @ kbar.mT + log_count
    key_mean = k.mean(dim=2, keepdim=True).to(qhat.dtype)
    return scale * qhat @ key_mean.mT + log_count


def block_scores(probe: Probe, tail_log_mass: torch.Tensor) -> torch.Tensor:
    """Expected squared tail error of dropping each block alone, in units of the value
    variance: ``(p - a)^2 + p^2`` (module docstring), (B, H, Mq, Mk)."""
    lse = torch.logsumexp(probe.log_mass, dim=-1, keepdim=True)
    p = torch.exp(probe.log_mass - lse)
    a = torch.exp(tail_log_mass - lse)
    return (p - a) ** 2 + p**2


def key_imbalance(probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """p_mj (B, H, Mq, Mk) and d_mj = p_mj (kap_mj - K_m) (B, H, Mq, Mk, r)."""
    assert probe.key_sketch is not None
    p = probe.mass()
    mean = (p.unsqueeze(-1) * probe.key_sketch).sum(dim=-2, keepdim=True)
    return p, p.unsqueeze(-1) * (probe.key_sketch - mean)


def greedy_drop_torch(
    p: torch.Tensor,
    d: torch.Tensor,
    steps: int,
    kappa: float,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy minimisation of J(T) (module docstring), one block per step.

    Args:
        p: (..., Mk) block masses; d: (..., Mk, r) block imbalances.
        steps: blocks to pick, in [1, Mk].
        allowed: (..., Mk) bool, the blocks it may pick (default every block), at least
            ``steps`` per row; the others stay dropped and count in J's kappa term.

    Returns:
        picks (..., steps) int64 key-block ids in the order picked (distinct) and J after each
        step (..., steps). Ties go to the lowest id.
    """
    norms = (d * d).sum(-1)
    total = d.new_zeros(*d.shape[:-2], d.shape[-1])
    mass = p.new_zeros(p.shape[:-1])
    rest = norms.sum(-1)
    kept = torch.zeros_like(p, dtype=torch.bool) if allowed is None else ~allowed
    big = torch.finfo(p.dtype).max
    picks, values = [], []
    for _ in range(steps):
        cross = (d @ total.unsqueeze(-1)).squeeze(-1)
        num = (total * total).sum(-1, keepdim=True) + 2 * cross + norms
        num = num + kappa * (rest.unsqueeze(-1) - norms)
        den = (mass.unsqueeze(-1) + p) ** 2
        objective = (num / den.clamp_min(torch.finfo(p.dtype).tiny)).clamp(max=big)
        objective = objective.masked_fill(kept, float("inf"))
        j = objective.argmin(dim=-1, keepdim=True)
        picks.append(j.squeeze(-1))
        values.append(objective.gather(-1, j).squeeze(-1))
        kept.scatter_(-1, j, True)
        total = total + d.gather(-2, j.unsqueeze(-1).expand(*j.shape, d.shape[-1])).squeeze(-2)
        mass = mass + p.gather(-1, j).squeeze(-1)
        rest = rest - norms.gather(-1, j).squeeze(-1)
    return torch.stack(picks, -1), torch.stack(values, -1)


def greedy_candidates(log_mass: torch.Tensor, steps: int, candidates: int) -> torch.Tensor | None:
    """Ids (B, H, Mq, C), ascending per row, of the C = max(``candidates``, 4 ``steps``) key
    blocks of largest probe mass per query block; ``None`` when C covers every block."""
    count = max(candidates, 4 * steps)
    if count >= log_mass.shape[-1]:
        return None
    return log_mass.topk(count, dim=-1).indices.sort(dim=-1).values


def greedy_drop(
    probe: Probe, steps: int, kappa: float, candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`greedy_drop_torch` on the probe's imbalances, picking among the
    :func:`greedy_candidates` only; one Triton program per query block on CUDA
    (:func:`tailattn.kernels.error_scoring.greedy_drop`)."""
    sketch = probe.key_sketch
    if sketch is None:
        raise ValueError("greedy_drop needs a probe with key sketches")
    ids = greedy_candidates(probe.log_mass, steps, candidates)
    r = sketch.shape[-1]
    cuda = sketch.device.type == "cuda" and sketch.dtype != torch.float64
    if cuda and not r & (r - 1) and triton_installed():
        from ..kernels.error_scoring import greedy_drop as kernel

        return kernel(probe.log_mass, sketch, steps, kappa, ids)
    allowed = None
    if ids is not None:
        allowed = torch.zeros_like(probe.log_mass, dtype=torch.bool).scatter_(-1, ids, True)
    return greedy_drop_torch(*key_imbalance(probe), steps, kappa, allowed)


@dataclass(frozen=True)
class ProbeMerge:
    """Probes of ``tile`` queries (``block_q / tile`` per query block) merged per query block."""

    tile: int
    block_q: int

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, P, ...) per probe -> (B, H, Mq, ...) mean over each query block's probes."""
        if self.tile == self.block_q:
            return x
        ratio = self.block_q // self.tile
        mq = num_blocks(x.shape[2], ratio)
        padded = x.new_zeros(x.shape[0], x.shape[1], mq * ratio, *x.shape[3:])
        padded[:, :, : x.shape[2]] = x
        probes = block_sizes(x.shape[2], ratio, x.device).to(x.dtype)
        total = padded.view(x.shape[0], x.shape[1], mq, ratio, *x.shape[3:]).sum(3)
        return total / probes.view(mq, *([1] * (x.ndim - 3)))

    def probe(self, probe: Probe) -> Probe:
        """One probe per query block whose masses and imbalances are the means of its probes'
        (log p, and d / p as the mean key, so that :func:`key_imbalance` gives them back)."""
        if self.tile == self.block_q:
            return probe
        p, d = (self.mean(x) for x in key_imbalance(probe))
        tiny = torch.finfo(p.dtype).tiny
        return Probe(torch.log(p.clamp_min(tiny)), d / p.clamp_min(tiny).unsqueeze(-1))


def adaptive_counts(gains: torch.Tensor, total: int) -> torch.Tensor:
    """Blocks per query block from per-step gains (B, H, Mq, S), each row non-increasing: one
    block each, and the ``total - Mq`` largest gains of steps 2..S over the head. (B, H, Mq)."""
    b, h, mq, steps = gains.shape
    extra = min(total - mq, mq * (steps - 1))
    flat = gains[..., 1:].reshape(b, h, -1)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if extra > 0:
        chosen.scatter_(-1, flat.topk(extra, dim=-1).indices, True)
    return 1 + chosen.view(b, h, mq, steps - 1).sum(-1)


def non_increasing(gains: torch.Tensor) -> torch.Tensor:
    """max over the later steps, so a row's chosen gains are a prefix: (..., S)."""
    return gains.flip(-1).cummax(dim=-1).values.flip(-1)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


@registry.selection(
    "block-err", granularity="block", summary="blocks ranked by the estimated tail error"
)
@dataclass(frozen=True)
class BlockErr:
    """Error-aware block selection (module docstring): per query block, the key blocks whose
    dropping the tail ``for_tail`` would get most wrong, under the block-topk budget."""

    keep: float
    for_tail: str = "uta"
    order: str = "none"
    budget: str = "fixed"
    kappa: float = 0.25
    sketch: int = 32
    candidates: int = 256
    text_tokens: int = 0
    probe: int | None = None
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        check_fraction(self.keep, "keep")
        check_choice(self.for_tail, "for_tail", FOR_TAILS)
        check_choice(self.order, "order", ORDERS)
        check_choice(self.budget, "budget", BUDGETS)
        kappa = self.kappa
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
            raise TypeError(f"kappa must be a number >= 0, got {kappa!r}")
        if not 0 <= kappa < math.inf:
            raise ValueError(f"kappa must be a finite number >= 0, got {kappa}")
        check_positive(self.sketch, "sketch", integer=True)
        check_positive(self.candidates, "candidates", integer=True)
        value = self.text_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"text_tokens must be an integer >= 0, got {value!r}")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")
        if self.probe is not None:
            check_positive(self.probe, "probe", integer=True)
            if self.block_q % self.probe:
                raise ValueError(
                    f"probe must divide block_q, got probe={self.probe}, block_q={self.block_q}"
                )

    @property
    def search(self) -> str:
        """``greedy`` (the set function of ``drop``) or ``rank`` (per-block tail errors)."""
        return "greedy" if self.for_tail == "drop" else "rank"

    def new_state(self) -> SVG2State | None:
        """SVG2's centroids when the order is SVG2's clusters (one per layer), else ``None``."""
        return SVG2State() if self.order == "svg2" else None

    def permutations(
        self, q: torch.Tensor, k: torch.Tensor, grid: Any, state: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Query and key permutations of ``order``."""
        if self.order == "none":
            return None, None
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"order={self.order!r} reorders a self-attention: q has {q.shape[2]} tokens "
                f"but k has {k.shape[2]}"
            )
        if self.order == "svg2":
            sel = SVG2(keep=self.keep, block_q=self.block_q, block_k=self.block_k)
            q_km, k_km = sel.cluster(q, k, state)
            return q_km.perm, k_km.perm
        if grid is None:
            raise ValueError(f"order={self.order!r} needs grid=(T, H, W), the latent video grid")
        grid = check_grid(grid, k.shape[2], self.text_tokens)
        perm = grid_order(grid, self.order, self.text_tokens, q.device)[0]
        return perm, perm

    def ranking(
        self, q: torch.Tensor, k: torch.Tensor, scale: float, budget: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Key blocks per query block, most wanted first (B, H, Mq, R), and the gain of each
        (non-increasing, comparable over query blocks: the adaptive budget's currency)."""
        mk = num_blocks(k.shape[2], self.block_k)
        tile = self.probe or self.block_q
        qhat = pool_blocks(q, tile)
        merge = ProbeMerge(tile, self.block_q)
        if self.search == "greedy":
            probe = merge.probe(probe_stats(qhat, k, scale, self.block_k, self.sketch))
            steps = budget if self.budget == "fixed" else min(mk, 2 * budget)
            picks, objective = greedy_drop(probe, steps, float(self.kappa), self.candidates)
            before = torch.cat([objective[..., :1], objective[..., :-1]], dim=-1)
            return picks, non_increasing(before - objective)
        probe = probe_stats(qhat, k, scale, self.block_k, None)
        tail = tail_log_mass(qhat, k, scale, self.block_k, self.for_tail)
        scores = merge.mean(block_scores(probe, tail.to(probe.log_mass.dtype)))
        gains, ranked = scores.topk(budget if self.budget == "fixed" else mk, dim=-1)
        return ranked, gains

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: Any = None,
    ) -> BlockLayout:
        if state is not None and not isinstance(state, SVG2State):
            raise TypeError(f"state must be an SVG2State or None, got {type(state).__name__}")
        q_perm, kv_perm = self.permutations(q, k, grid, state)
        qp, kp = permute_tokens(q, q_perm), permute_tokens(k, kv_perm)
        budget = block_budget(self.keep, num_blocks(k.shape[2], self.block_k))
        ranked, gains = self.ranking(qp, kp, scale, budget)
        if self.budget == "fixed":
            counts = torch.full(ranked.shape[:3], budget, dtype=torch.int64, device=q.device)
        else:
            counts = adaptive_counts(gains, budget * ranked.shape[2])
        # distinct ids and counts in [1, R] by construction: layout_from_ranking skips the checks
        return layout_from_ranking(
            ranked, counts, q.shape[2], k.shape[2], self.block_q, self.block_k, q_perm, kv_perm
        )

r"""DFSAttn: curve reordering, hierarchical block scores, a mask cache over steps.

1. Reorder the video tokens along a 3D curve over the grid (T, H, W), text tokens last
   (:func:`tailattn.select.curves.grid_order`; ``curve="hilbert"`` is the paper's Hilbert curve,
   ``"gilbert"`` the generalized one for any side lengths, ``"none"`` row-major). The layout
   carries the permutation, so the executor permutes q, k, v and un-permutes the output.
2. Hierarchical block scoring: mean-pool q and k over tiles of ``tile`` (16) tokens, tile
   probabilities over all key tiles b and block scores summed over the tiles of query block m
   and key block n (``block_q`` x ``block_k``, 128 x 128):

       P_ab = softmax_b(s qbar_a . kbar_b + log n_b),     S_mn = sum_{a in m, b in n} P_ab.

   (``log n_b`` is ours: it only matters for a ragged last tile, equal tiles cancel it.)
3. Keep the ``ceil(keep * Mk)`` key blocks of largest S_mn per (head, query block).
4. Mask cache with adaptive keep (with a :class:`DFSState`, one per attention layer and
   guidance branch, passed on every diffusion step): the state counts the calls it has seen
   (``state.step``; a pipeline may set it to the diffusion step before a call). Steps
   ``< warmup`` (12 of 50) run dense; the mask is rebuilt at the ``rebuild`` steps (12, 24, 36)
   and whenever the keep ratio changes, and reused in between. The keep ratio at a step is
   ``keep`` when given, else ``keeps[i]`` of the last rebuild step i reached (0.3, 0.2, 0.1).
   A state is bound to the (grid, batch, heads, tokens, device, curve and block sizes) of its
   first call: any other call raises instead of serving a stale mask. ``state.history`` logs
   (step, action, keep) with action ``dense``, ``rebuild`` or ``reuse``.

Without a state every call scores and selects afresh at ``keep`` (``keeps[-1]`` when not
given). Dense layers (Wan's layer 0) and dense cross-attention are the pipeline's business
(``tailattn.integrations.diffusers``: pass ``warmup_steps=0`` there, the state warms up itself).
Tails: ``dfs+uta``, ``dfs+blocks``, ``dfs+moment`` aggregate the dropped blocks (ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._checks import check_fraction, check_grid
from ..layout import BlockLayout, block_sizes, num_blocks
from ..methods import registry
from ..permute import permute_tokens
from .blocks import block_budget, check_block_size, pool_blocks
from .curves import check_curve, grid_order

SCORE_CHUNK_BYTES = 64 * 2**20
"""Bytes of one chunk of tile probabilities (query tiles x key tiles)."""


def tile_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    tile: int,
    block_q: int,
    block_k: int,
    chunk_bytes: int = SCORE_CHUNK_BYTES,
) -> torch.Tensor:
    """Hierarchical block scores ``S_mn = sum_{a in m, b in n} P_ab`` (B, H, Mq, Mk).

    ``tile`` must divide ``block_q`` and ``block_k``. Streams over chunks of query tiles, so
    memory is O(chunk * key tiles).
    """
    qt, kt = pool_blocks(q, tile), pool_blocks(k, tile)
    b, h, n_qt, _ = qt.shape
    n_kt = kt.shape[2]
    n_q, n_k = q.shape[2], k.shape[2]
    log_n = torch.log(block_sizes(n_k, tile, q.device).to(qt.dtype))
    key_block = torch.arange(n_kt, device=q.device) * tile // block_k
    query_block = torch.arange(n_qt, device=q.device) * tile // block_q
    mk = num_blocks(n_k, block_k)
    scores = qt.new_zeros(b, h, num_blocks(n_q, block_q), mk)
    step = max(1, chunk_bytes // (b * h * n_kt * qt.element_size() * 2))
    for start in range(0, n_qt, step):
        rows = slice(start, min(start + step, n_qt))
        probs = torch.softmax(scale * qt[:, :, rows] @ kt.mT + log_n, dim=-1)
        per_block = probs.new_zeros(*probs.shape[:3], mk).index_add_(-1, key_block, probs)
        scores.index_add_(2, query_block[rows], per_block)
    return scores


def _tuple_of(value: object, cast: type, name: str) -> tuple:
    """A tuple from a tuple/list or a ``"a/b/c"`` string (spec strings cannot hold tuples)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a sequence such as 12/24/36, got {value!r}")
    items = value.split("/") if isinstance(value, str) else value
    if isinstance(value, (int, float)):
        items = (value,)
    try:
        return tuple(cast(x) for x in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence such as 12/24/36, got {value!r}") from None


@dataclass
class DFSState:
    """The mask cache of one attention layer (module docstring, step 4).

    Attributes:
        step: calls seen so far (the diffusion step of the next call); may be set by a pipeline.
        layout: the cached layout, or None before the first rebuild.
        keep: the keep ratio the cached layout was built with.
        bound_to: (grid, text_tokens, batch, heads, Nq, Nk, device, selection config) of the
            first call.
        history: (step, action, keep) per call; action is dense, rebuild or reuse.
    """

    step: int = 0
    layout: BlockLayout | None = None
    keep: float | None = None
    bound_to: tuple | None = None
    history: list[tuple[int, str, float | None]] = field(default_factory=list)


@registry.selection("dfs", granularity="block", summary="curve order, tile->block top-k, cache")
@dataclass(frozen=True)
class DFS:
    """DFSAttn: 3D-curve reordering, hierarchical 16->128 block scores, block top-k, mask cache."""

    keep: float | None = None
    curve: str = "gilbert"
    tile: int = 16
    block_q: int = 128
    block_k: int = 128
    warmup: int = 12
    rebuild: Any = (12, 24, 36)
    keeps: Any = (0.3, 0.2, 0.1)
    text_tokens: int = 0

    steps_state: ClassVar[bool] = True
    """Its state follows diffusion steps (a mask cache): one-off evaluations pass none."""

    def __post_init__(self) -> None:
        if self.keep is not None:
            check_fraction(self.keep, "keep")
        check_curve(self.curve)
        check_block_size(self.tile, "tile")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")
        if self.block_q % self.tile or self.block_k % self.tile:
            raise ValueError(
                f"tile must divide block_q and block_k, got tile={self.tile}, "
                f"block_q={self.block_q}, block_k={self.block_k}"
            )
        for name in ("warmup", "text_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        rebuild = _tuple_of(self.rebuild, int, "rebuild")
        keeps = tuple(check_fraction(x, "keeps") for x in _tuple_of(self.keeps, float, "keeps"))
        if not rebuild or len(rebuild) != len(keeps):
            raise ValueError(
                f"rebuild and keeps must have the same, non-zero length (a keep ratio per "
                f"rebuild step), got rebuild={rebuild} and keeps={keeps}"
            )
        if any(s < 0 for s in rebuild) or list(rebuild) != sorted(set(rebuild)):
            raise ValueError(f"rebuild must be increasing steps >= 0, got {rebuild}")
        object.__setattr__(self, "rebuild", rebuild)
        object.__setattr__(self, "keeps", keeps)

    def new_state(self) -> DFSState:
        """A fresh per-layer mask cache (the diffusers integration asks for one per layer)."""
        return DFSState()

    @property
    def config(self) -> tuple[str, int, int, int]:
        """What a cached mask depends on besides the inputs: (curve, tile, block_q, block_k)."""
        return (self.curve, self.tile, self.block_q, self.block_k)

    def keep_at(self, step: int) -> float:
        """The keep ratio of a sparse call at ``step`` (module docstring, step 4)."""
        if self.keep is not None:
            return self.keep
        reached = [i for i, s in enumerate(self.rebuild) if s <= step]
        return self.keeps[reached[-1] if reached else 0]

    def select(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        grid: tuple[int, int, int],
        keep: float,
    ) -> BlockLayout:
        """Score the reordered blocks and keep the top ``ceil(keep * Mk)`` per query block."""
        perm = (
            None
            if self.curve == "none"
            else grid_order(grid, self.curve, self.text_tokens, q.device)[0]
        )
        qp, kp = permute_tokens(q, perm), permute_tokens(k, perm)
        scores = tile_block_scores(qp, kp, scale, self.tile, self.block_q, self.block_k)
        budget = block_budget(keep, scores.shape[-1])
        kept = scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values
        counts = torch.full(scores.shape[:3], budget, dtype=torch.int32, device=q.device)
        n = q.shape[2]
        return BlockLayout(
            kept.to(torch.int32), counts, n, n, self.block_q, self.block_k, perm, perm, check=False
        )

    def _dense(self, q: torch.Tensor, grid: tuple[int, int, int]) -> BlockLayout:
        b, h, n, _ = q.shape
        shape = (b, h, num_blocks(n, self.block_q), num_blocks(n, self.block_k))
        mask = torch.ones(shape, dtype=torch.bool, device=q.device)
        return BlockLayout.from_dense(mask, n, n, self.block_q, self.block_k, check=False)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: DFSState | None = None,
    ) -> BlockLayout:
        if grid is None:
            raise ValueError("dfs needs grid=(T, H, W), the latent video grid of the tokens")
        grid = check_grid(grid, k.shape[2], self.text_tokens)
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"dfs reorders a self-attention: q has {q.shape[2]} tokens but k has {k.shape[2]}"
            )
        if state is None:
            return self.select(q, k, scale, grid, self.keep_at(max(self.rebuild)))
        if not isinstance(state, DFSState):
            raise TypeError(f"state must be a DFSState or None, got {type(state).__name__}")
        bound = (grid, self.text_tokens, *q.shape[:3], k.shape[2], str(q.device), self.config)
        if state.bound_to is None:
            state.bound_to = bound
        elif state.bound_to != bound:
            raise ValueError(
                f"this DFSState was built for (grid, text_tokens, batch, heads, Nq, Nk, device, "
                f"(curve, tile, block_q, block_k)) = "
                f"{state.bound_to} but this call has {bound}; use one DFSState per attention "
                f"layer and guidance branch, and a new one for a new video shape"
            )
        step = state.step
        state.step += 1
        if step < self.warmup:
            state.history.append((step, "dense", None))
            return self._dense(q, grid)
        keep = self.keep_at(step)
        if state.layout is None or step in self.rebuild or state.keep != keep:
            state.layout, state.keep = self.select(q, k, scale, grid, keep), keep
            state.history.append((step, "rebuild", keep))
        else:
            state.history.append((step, "reuse", keep))
        return state.layout

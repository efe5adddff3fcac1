r"""The method contract: what selections and tails provide, as typing Protocols.

A method is a selection (which (query, key) pairs are computed exactly) plus a tail (what the
dropped keys become). Selections come in three kinds, tails in two; the registry
(:mod:`tailattn.methods`) pairs each selection kind with its tail kind and binds both once:

========================  ============================  ======================================
selection kind             what it provides               tails it takes
========================  ============================  ======================================
:class:`TokenSelection`    kept mask from exact logits    :class:`TokenTail` (oracle study)
:class:`BlockSelection`    a :class:`BlockLayout`         :class:`BlockTail` (kernel or reference)
:class:`FusedSelection`    runs the attention itself      :class:`BlockTail`
========================  ============================  ======================================

(dense attention, ``full``, is a selection with nothing to provide.) Selections that carry
state across diffusion steps (SVG2's centroids, DFSAttn's mask cache) also satisfy
:class:`Stateful`. A block tail declares what the fused kernels compute for it
(:class:`KernelTail`) and what must happen after the kernel (:meth:`BlockTail.epilogue`), so
no code dispatches on a tail's name.

Shapes: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), always validated and in the
(B, H, N, D) layout when they reach a selection or a tail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .layout import BlockLayout
    from .tails.block import ChunkTail, KeyBlockSums
    from .tails.token import TailTokens

Grid = tuple[int, int, int]
"""The latent video grid (T, H, W) of the tokens, in (t, h, w) row-major order."""


class KernelTail(str, Enum):
    """What the fused Triton kernels compute for a block tail, inside the key loop.

    * ``DROP``: nothing (the kept blocks renormalized, Eq. 5).
    * ``UTA``: one token per query from the mean dropped key and value (total minus the kept
      blocks' sums, Eq. 10-13).
    * ``BLOCKS``: one pooled token (s q.kbar_j + log n_j, vbar_j) per dropped key block.
    """

    DROP = "drop"
    UTA = "uta"
    BLOCKS = "blocks"


FATE_UNSEEN, FATE_NO_PV, FATE_COMPUTED = 0, 1, 2
"""In-loop skipping (``blasst``, ``recall``): a key tile's fate in a query tile, skipped before
its QK, skipped before its P.V, or computed; the same codes in the Triton kernel
(:mod:`tailattn.kernels.skipping`) and its reference (:mod:`tailattn.select.dynamic`)."""

SKIP_SAFETY = 1e-3
"""Relative margin of the recall test of in-loop skipping: a tile is skipped when its mass is
below ``(1 - SKIP_SAFETY)`` times its share, so logits rounded by up to ~1e-3 cannot break the
guarantee (docs/skipping.md)."""


@dataclass(frozen=True)
class Result:
    """What running a bound method returns.

    Attributes:
        out: (B, H, Nq, Dv) in original token order (the accumulation dtype on the reference
            paths, the input dtype on the kernels).
        lse: (B, H, Nq) log-sum-exp of the represented mass (natural log), float32 or float64.
        stats: per-query statistics (B, H, Nq) by name, only when they were asked for.
        info: further entries of the info dict of :func:`tailattn.attention` (``density``,
            ``layout``, ...), only when they were asked for.
    """

    out: torch.Tensor
    lse: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class DenseSelection(Protocol):
    """Dense attention (``full``): a selection with nothing to provide."""


@runtime_checkable
class TokenSelection(Protocol):
    """An oracle selection: it sees the exact logits of a chunk of queries.

    ``selection(z)`` with logits z (B, H, Cq, Nk) returns the bool kept mask of the same shape;
    every query keeps at least one key and no key twice.
    """

    def __call__(self, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class BlockSelection(Protocol):
    """A practical selection: from q and k (never the full logits) a :class:`BlockLayout` of
    kept key blocks per query block, with optional token permutations.

    ``grid`` is the latent video grid when the caller knows it (grid-based selections need it),
    ``state`` the per-layer object of a :class:`Stateful` selection (``None`` otherwise).
    """

    block_q: int
    block_k: int

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        grid: Grid | None = None,
        state: Any = None,
    ) -> BlockLayout: ...


@runtime_checkable
class FusedSelection(Protocol):
    """A selection that decides while it computes (in-loop skipping, Rectified's rescaling), so
    it runs the attention itself and merges the tail of what it dropped.

    ``backend`` is ``"reference"``, ``"triton"`` or ``None`` (the kernel where it can run); the
    reference path rejects NaN/Inf (``tailattn.execute.check_values``), the kernel path does not
    look at values.
    """

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tail: BlockTail,
        *,
        scale: float,
        grid: Grid | None = None,
        state: Any = None,
        with_stats: bool = False,
        backend: str | None = None,
    ) -> Result: ...


@runtime_checkable
class Stateful(Protocol):
    """A selection that carries state from one call of a layer to the next (diffusion steps).

    Callers keep one state per attention layer and guidance branch and pass it as ``state=``.
    """

    def new_state(self) -> Any: ...


@runtime_checkable
class TokenTail(Protocol):
    """A tail on exact logits: the dropped keys of each query become a few tokens.

    ``tail(z, kept, v)`` with logits z (B, H, Cq, Nk), the kept mask of the same shape and the
    values (B, H, Nk, Dv) returns :class:`~tailattn.tails.token.TailTokens` (logits, values,
    the logit each dropped key implicitly receives, token counts).
    """

    def __call__(self, z: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> TailTokens: ...


@runtime_checkable
class BlockTail(Protocol):
    """A tail of dropped key blocks, from per-key-block sums (total minus kept).

    The reference executor calls :meth:`prepare` once per layout and :meth:`tokens` per chunk
    of query blocks; the kernel path runs the fused kernel with :attr:`kernel` and then
    :meth:`epilogue`. Tails subclass this Protocol to inherit the defaults.
    """

    kernel: ClassVar[KernelTail | None] = None
    """What the fused kernel computes for this tail inside its loop; ``None``: no kernel form,
    the method runs on the reference executor (a new tail gets the kernel path by declaring
    one, plus an :meth:`epilogue` for what the kernel does not compute)."""
    second_moments: ClassVar[bool] = False
    """Whether :meth:`prepare` needs per-block sums of k k^T and k v^T."""

    def prepare(self, sums: KeyBlockSums, kept: torch.Tensor) -> Any:
        """Per-layout statistics from the key-block sums and the float 0/1 block mask
        (B, H, Mq, Mk); by default the dropped set's count and means."""
        from .tails.block import dropped_summary

        return dropped_summary(sums, kept)

    def tokens(
        self,
        summary: Any,
        q_blocks: torch.Tensor,
        rows: slice,
        kept: torch.Tensor,
        scale: float,
    ) -> ChunkTail:
        """Tail tokens of query blocks ``rows``: q_blocks (B, H, c, bq, D), kept bool
        (B, H, c, Mk); ``summary`` is what :meth:`prepare` returned for the whole layout."""
        ...

    def epilogue(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: BlockLayout,
        out: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What follows the fused kernel: out (B, H, Nq, Dv) and lse (B, H, Nq) of the kernel
        (with :attr:`kernel` inside) in, the tail's final out and lse in original token order
        out. Nothing by default: the kernel already merged the tail."""
        return out, lse


Selection = TokenSelection | BlockSelection | FusedSelection | DenseSelection
"""Any kind of selection (what a :class:`~tailattn.methods.BoundMethod` holds)."""
Tail = TokenTail | BlockTail
"""Any kind of tail."""

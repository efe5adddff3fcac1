r"""Tail estimators at block granularity, computed from per-key-block sums.

A block selection keeps whole key blocks per query block m; the dropped set D_m of a query of
block m is every token of the non-kept key blocks (the same for all queries of the block). Block
tails never look at individual dropped keys: they use per-key-block sums and take the dropped
part as **total minus kept** (what a fused kernel can afford: it only visits kept blocks):

    N_d = N_k - sum_{j kept} n_j,    sum_D k = sum_all k - sum_{j kept} sum_{i in j} k_i.

Keys and values are centered on their mean over all tokens before summing (the shift is added
back to the means; covariances do not depend on it), which keeps the total-minus-kept
differences accurate in float32. Per query i of block m, with logits z = s q.k:

* ``drop``: no token (Top-K renormalization over the kept blocks, Eq. 5).
* ``uta``: one token, logit ``s q_i . kbar_D + log N_d`` (= mean_D z + log N_d exactly, Eq. 13)
  and value ``vbar_D`` (Eq. 10-14).
* ``blocks``: every dropped key block j is one token, logit ``s q_i . kbar_j + log n_j`` and
  value ``vbar_j``; with blocks of one token this is exact attention.
* ``moment`` (ours, see :mod:`tailattn.tails.token`): the ``uta`` token with logit
  ``+ log(1 + sigma^2/2)`` and value ``vbar_D + c / (1 + sigma^2/2)``, where
  ``sigma^2 = s^2 q_i^T Cov_D(k) q_i``, ``c = s C_D^T q_i`` and
  ``C_D = mean_D (k - kbar)(v - vbar)^T``; Cov_D and C_D come from per-block sums of k k^T
  and k v^T (total minus kept): O(d^2) per query.

The executor (:func:`tailattn.reference.block_attention`) calls ``prepare`` once per layout and
``tokens`` once per chunk of query blocks, and merges the tokens by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..contract import BlockTail, KernelTail
from ..layout import BlockLayout, block_sizes, to_blocks
from ..methods import registry
from ..parts import merge_tokens, softmax_part
from ..permute import permute_tokens, unpermute_tokens


@dataclass(frozen=True)
class KeyBlockSums:
    """Sums over each key block of the centered keys and values (accumulation dtype).

    Attributes:
        counts: (Mk,) tokens per key block.
        key_shift, value_shift: (B, H, 1, D) and (B, H, 1, Dv), the mean key and value.
        keys, values: (B, H, Mk, D), (B, H, Mk, Dv): sums of k - key_shift, v - value_shift.
        key_key: (B, H, Mk, D, D) sums of centered k k^T, or None.
        key_value: (B, H, Mk, D, Dv) sums of centered k v^T, or None.
    """

    counts: torch.Tensor
    key_shift: torch.Tensor
    value_shift: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    key_key: torch.Tensor | None = None
    key_value: torch.Tensor | None = None


def key_block_sums(
    k: torch.Tensor, v: torch.Tensor, block_k: int, second_moments: bool = False
) -> KeyBlockSums:
    """Per-key-block sums of (B, H, Nk, D) keys and (B, H, Nk, Dv) values in their own dtype."""
    key_shift, value_shift = k.mean(dim=2, keepdim=True), v.mean(dim=2, keepdim=True)
    kb, vb = to_blocks(k - key_shift, block_k), to_blocks(v - value_shift, block_k)
    counts = block_sizes(k.shape[2], block_k, k.device).to(k.dtype)
    extra = {}
    if second_moments:
        kt = kb.transpose(-1, -2)
        extra = {"key_key": kt @ kb, "key_value": kt @ vb}
    return KeyBlockSums(counts, key_shift, value_shift, kb.sum(3), vb.sum(3), **extra)


def _dropped(kept: torch.Tensor, per_block: torch.Tensor) -> torch.Tensor:
    """Sum over all blocks minus sum over kept blocks: (B, H, Mk, F) -> (B, H, Mq, F)."""
    return per_block.sum(dim=2, keepdim=True) - torch.matmul(kept, per_block)


@dataclass(frozen=True)
class DroppedSummary:
    """Statistics of the dropped set of every query block (B, H, Mq, ...).

    ``count`` N_d; ``key_mean`` kbar_D and ``value_mean`` vbar_D (uncentered); ``key_cov``
    Cov_D(k) (D, D) and ``cross_cov`` C_D (D, Dv) when second moments were summed. Means of an
    empty dropped set are 0.
    """

    count: torch.Tensor
    key_mean: torch.Tensor
    value_mean: torch.Tensor
    key_cov: torch.Tensor | None = None
    cross_cov: torch.Tensor | None = None


def dropped_summary(sums: KeyBlockSums, kept: torch.Tensor) -> DroppedSummary:
    """Total minus kept, per query block; ``kept`` is the float (B, H, Mq, Mk) 0/1 block mask."""
    count = sums.counts.sum() - torch.matmul(kept, sums.counts)
    safe = count.clamp_min(1.0).unsqueeze(-1)
    key_c = _dropped(kept, sums.keys) / safe
    value_c = _dropped(kept, sums.values) / safe
    empty = (count == 0).unsqueeze(-1)
    key_mean = (key_c + sums.key_shift).masked_fill(empty, 0.0)
    value_mean = (value_c + sums.value_shift).masked_fill(empty, 0.0)
    if sums.key_key is None or sums.key_value is None:
        return DroppedSummary(count, key_mean, value_mean)
    b, h, mq, _ = kept.shape
    d, dv = sums.key_value.shape[-2:]
    second = _dropped(kept, sums.key_key.flatten(-2)).view(b, h, mq, d, d)
    cross = _dropped(kept, sums.key_value.flatten(-2)).view(b, h, mq, d, dv)
    key_cov = second / safe.unsqueeze(-1) - key_c.unsqueeze(-1) * key_c.unsqueeze(-2)
    cross_cov = cross / safe.unsqueeze(-1) - key_c.unsqueeze(-1) * value_c.unsqueeze(-2)
    return DroppedSummary(count, key_mean, value_mean, key_cov, cross_cov)


@dataclass(frozen=True)
class ChunkTail:
    """Tail tokens of a chunk of c query blocks (B, H, c, bq queries each).

    Attributes:
        logits: (B, H, c, bq, T) token logits (log of the mass each stands for); -inf = empty.
        values: (B, H, c, bq or 1, T, Dv), or None when there is no token.
        implied: (B, H, c, bq, Mk or 1) the logit every key of a dropped key block implicitly
            receives (one column broadcast over blocks when it is the same for all); entries of
            kept blocks are unspecified.
        tokens: (B, H, c) number of non-empty tail tokens of each query block.
    """

    logits: torch.Tensor
    values: torch.Tensor | None
    implied: torch.Tensor
    tokens: torch.Tensor


def _mean_logit(q_blocks: torch.Tensor, key_mean: torch.Tensor, scale: float) -> torch.Tensor:
    """``s q_i . kbar`` per query: (B, H, c, bq, D), (B, H, c, D) -> (B, H, c, bq)."""
    return scale * torch.matmul(q_blocks, key_mean.unsqueeze(-1)).squeeze(-1)


@registry.tail("drop", granularity="block", summary="discard the dropped blocks")
@dataclass(frozen=True)
class BlockDrop(BlockTail):
    """Discard the dropped blocks: the kept weights are renormalized (Eq. 5)."""

    kernel: ClassVar[KernelTail] = KernelTail.DROP

    def prepare(self, sums: KeyBlockSums, kept: torch.Tensor) -> None:
        return None

    def tokens(self, summary, q_blocks, rows, kept, scale) -> ChunkTail:
        b, h, c, bq, _ = q_blocks.shape
        return ChunkTail(
            logits=q_blocks.new_full((b, h, c, bq, 0), float("-inf")),
            values=None,
            implied=q_blocks.new_full((b, h, c, bq, 1), float("-inf")),
            tokens=q_blocks.new_zeros(b, h, c),
        )


@registry.tail("uta", granularity="block", summary="one token: s q.kbar_D + log N_d, vbar_D")
@dataclass(frozen=True)
class BlockUTA(BlockTail):
    """UTA over the dropped blocks: one token (s q.kbar_D + log N_d, vbar_D) (Eq. 10-14)."""

    kernel: ClassVar[KernelTail] = KernelTail.UTA

    def tokens(self, summary: DroppedSummary, q_blocks, rows, kept, scale) -> ChunkTail:
        count = summary.count[:, :, rows]
        zbar = _mean_logit(q_blocks, summary.key_mean[:, :, rows], scale)
        logit = zbar + torch.log(count).unsqueeze(-1)
        return ChunkTail(
            logits=logit.unsqueeze(-1),
            values=summary.value_mean[:, :, rows, None, None, :],
            implied=zbar.unsqueeze(-1),
            tokens=(count > 0).to(q_blocks.dtype),
        )


@dataclass(frozen=True)
class BlockMeans:
    """Mean key (B, H, Mk, D) and value (B, H, Mk, Dv) and log count (Mk,) of every key block."""

    key_mean: torch.Tensor
    value_mean: torch.Tensor
    log_count: torch.Tensor


@registry.tail("blocks", granularity="block", summary="one token per dropped block")
@dataclass(frozen=True)
class PooledBlocks(BlockTail):
    """Every dropped key block j is one token (s q.kbar_j + log n_j, vbar_j)."""

    kernel: ClassVar[KernelTail] = KernelTail.BLOCKS

    def prepare(self, sums: KeyBlockSums, kept: torch.Tensor) -> BlockMeans:
        counts = sums.counts.unsqueeze(-1)
        return BlockMeans(
            sums.keys / counts + sums.key_shift,
            sums.values / counts + sums.value_shift,
            torch.log(sums.counts),
        )

    def tokens(self, summary: BlockMeans, q_blocks, rows, kept, scale) -> ChunkTail:
        mean_logits = scale * torch.matmul(q_blocks, summary.key_mean.unsqueeze(2).mT)
        dropped = ~kept.unsqueeze(-2)  # (B, H, c, 1, Mk)
        # the dropped-block tokens form one log-sum-exp part, merged as a single token
        out, lse = softmax_part(
            mean_logits + summary.log_count, summary.value_mean.unsqueeze(2), dropped
        )
        return ChunkTail(
            logits=lse.unsqueeze(-1),
            values=out.unsqueeze(-2),
            implied=mean_logits,
            tokens=dropped.squeeze(-2).sum(dim=-1).to(q_blocks.dtype),
        )


@registry.tail("moment", granularity="block", summary="uta with a second-order mass/value fix")
@dataclass(frozen=True)
class BlockMoment(BlockTail):
    """The uta token corrected to second order: logit + log(1 + sigma^2/2), value
    vbar_D + c / (1 + sigma^2/2) (ours; :mod:`tailattn.tails.token`)."""

    kernel: ClassVar[KernelTail] = KernelTail.DROP
    second_moments: ClassVar[bool] = True

    def tokens(self, summary: DroppedSummary, q_blocks, rows, kept, scale) -> ChunkTail:
        count = summary.count[:, :, rows]
        zbar = _mean_logit(q_blocks, summary.key_mean[:, :, rows], scale)
        cov, cross = summary.key_cov[:, :, rows], summary.cross_cov[:, :, rows]
        sigma2 = scale**2 * (torch.matmul(q_blocks, cov) * q_blocks).sum(-1).clamp_min(0.0)
        gain = 1.0 + 0.5 * sigma2
        c = scale * torch.matmul(q_blocks, cross)  # (B, H, c, bq, Dv)
        logit = zbar + torch.log(count).unsqueeze(-1) + torch.log(gain)
        value = summary.value_mean[:, :, rows].unsqueeze(-2) + c / gain.unsqueeze(-1)
        return ChunkTail(
            logits=logit.unsqueeze(-1),
            values=value.unsqueeze(-2),
            implied=(zbar + torch.log(gain)).unsqueeze(-1),
            tokens=(count > 0).to(q_blocks.dtype),
        )

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
        """After the ``drop`` kernel: the second-order token from per-block sums in PyTorch,
        merged by log-sum-exp (a fused form would need the d x d covariance of each query
        block's dropped set inside the kernel)."""
        qp, kp, vp = (
            permute_tokens(x, perm).float()
            for x, perm in ((q, layout.q_perm), (k, layout.kv_perm), (v, layout.kv_perm))
        )
        kept = layout.to_dense()
        summary = self.prepare(key_block_sums(kp, vp, layout.block_k, True), kept.float())
        rows = slice(0, layout.num_q_blocks)
        tokens = self.tokens(summary, to_blocks(qp, layout.block_q), rows, kept, scale)
        b, h, n_q = q.shape[:3]
        logits = tokens.logits.reshape(b, h, -1)[:, :, :n_q]
        values = tokens.values.reshape(b, h, -1, v.shape[-1])[:, :, :n_q]
        logits = unpermute_tokens(logits, layout.q_perm)
        values = unpermute_tokens(values, layout.q_perm)
        merged, lse = merge_tokens(out.float(), lse, logits.unsqueeze(-1), values.unsqueeze(-2))
        return merged.to(out.dtype), lse

r"""Block-sparse reference executor: exact attention over a layout's kept blocks plus a block tail.

For query block m (in the layout's permuted order) with kept key blocks K_m and tail tokens t
from a block tail (:mod:`tailattn.tails.block`), every query i of the block gets

    O_i = (sum_{j in K_m} sum_{l in j} e^{z_il} v_l + sum_t e^{z_t} v_t)
          / (sum_{j in K_m} sum_{l in j} e^{z_il} + sum_t e^{z_t}),     z_il = s q_i . k_l,

the kept part computed exactly with max subtraction and merged with the tail tokens by
log-sum-exp (Eq. 14). The loop runs over chunks of query blocks and gathers only the kept key
blocks, so memory is O(chunk * kept keys), never N x N. Any block size >= 1 works here (the
Triton kernels take 64 or 128); the last block of either side may be ragged.

Statistics (``with_stats``), per query, in original order: ``density`` (kept keys / Nk),
``budget`` ((kept keys + tail tokens) / Nk), ``recall`` (exact kept probability mass),
``tail_mass_error`` and ``implied_tv`` (:mod:`tailattn.metrics`). They need the exact logits of
every key, which are computed per chunk of query blocks only when asked for.
"""

from __future__ import annotations

import torch

from .. import metrics
from .._checks import accumulation_dtype
from ..layout import BlockLayout, to_blocks
from ..methods import registry
from ..parts import merge_tokens, softmax_part
from ..permute import permute_tokens, unpermute_tokens
from ..tails.block import BlockTail, ChunkTail, key_block_sums
from .streaming import DEFAULT_CHUNK_BYTES

BLOCK_STAT_NAMES = ("density", "budget", "recall", "tail_mass_error", "implied_tv")


def check_block_inputs(
    q: torch.Tensor, k: torch.Tensor, layout: object, tail: object
) -> BlockLayout:
    """The layout must describe these (B, H, N, D) tensors; the tail must be a block tail."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"layout must be a tailattn.layout.BlockLayout, got {type(layout).__name__}"
        )
    if not isinstance(tail, BlockTail):
        known = ", ".join(registry.tails("block"))
        raise TypeError(f"tail must be a block tail ({known}), got {type(tail).__name__}")
    if layout.batch_heads != tuple(q.shape[:2]):
        raise ValueError(
            f"layout is for (batch, heads) = {layout.batch_heads} but q has {tuple(q.shape[:2])}"
        )
    if (layout.n_q, layout.n_k) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"layout is for {layout.n_q} queries and {layout.n_k} keys but q has {q.shape[2]} "
            f"and k has {k.shape[2]} tokens"
        )
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; they must match")
    return layout


def _blocks_per_chunk(
    layout: BlockLayout, d: int, dv: int, itemsize: int, with_stats: bool, chunk_bytes: int
) -> int:
    """Query blocks per chunk so that the chunk's working set stays near ``chunk_bytes``."""
    b, h = layout.batch_heads
    kept_keys = layout.kv_indices.shape[-1] * layout.block_k
    per_block = kept_keys * (d + dv) + 3 * layout.block_q * (kept_keys + layout.num_k_blocks)
    if with_stats:
        per_block += 6 * layout.block_q * layout.n_k
    return max(1, chunk_bytes // (b * h * per_block * itemsize))


def _gather_blocks(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """blocks (B, H, M, bs, D), index (B, H, c, K) -> (B, H, c, K * bs, D)."""
    b, h, _, bs, d = blocks.shape
    c, kmax = index.shape[2:]
    flat = index.reshape(b, h, c * kmax, 1, 1).expand(b, h, c * kmax, bs, d)
    return blocks.gather(2, flat).view(b, h, c, kmax * bs, d)


def _chunk_stats(
    q_blocks: torch.Tensor,
    k: torch.Tensor,
    kept: torch.Tensor,
    key_block: torch.Tensor,
    key_counts: torch.Tensor,
    tail: ChunkTail,
    lse: torch.Tensor,
    scale: float,
) -> dict[str, torch.Tensor]:
    """Per-query statistics (B, H, c, bq) of one chunk against its exact logits."""
    b, h, c, bq, d = q_blocks.shape
    n_k = k.shape[2]
    z = scale * torch.matmul(q_blocks.reshape(b, h, c * bq, d), k.mT).view(b, h, c, bq, n_k)
    kept_tokens = kept[..., key_block].unsqueeze(-2)  # (B, H, c, 1, Nk)
    implied = tail.implied
    implied = implied[..., key_block] if implied.shape[-1] > 1 else implied.expand_as(z)
    kept_keys = torch.matmul(kept.to(z.dtype), key_counts).unsqueeze(-1)  # (B, H, c, 1)
    return {
        "density": (kept_keys / n_k).expand(b, h, c, bq),
        "budget": ((kept_keys + tail.tokens.unsqueeze(-1)) / n_k).expand(b, h, c, bq),
        "recall": metrics.recall(z, kept_tokens),
        "tail_mass_error": metrics.tail_mass_error(z, kept_tokens, tail.logits),
        "implied_tv": metrics.implied_tv(z, kept_tokens, implied, lse),
    }


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    tail: BlockTail,
    scale: float,
    *,
    with_stats: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Block-sparse attention over validated (B, H, N, D) inputs (module docstring).

    Args:
        q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv), in original token order.
        layout: kept key blocks per query block, with its optional token permutations.
        tail: a block tail (``drop``, ``uta``, ``blocks``, ``moment``).
        scale: logit scale s.
        with_stats: also return the per-query statistics of :data:`BLOCK_STAT_NAMES`.
        chunk_bytes: target working-set size of one chunk of query blocks.

    Returns:
        out (B, H, Nq, Dv) and lse (B, H, Nq) in the accumulation dtype (float32, or float64 for
        float64 inputs) and in original token order, and the stats (B, H, Nq) when asked for.
    """
    layout = check_block_inputs(q, k, layout, tail)
    acc = accumulation_dtype(q.dtype)
    qp = permute_tokens(q, layout.q_perm).to(acc)
    kp = permute_tokens(k, layout.kv_perm).to(acc)
    vp = permute_tokens(v, layout.kv_perm).to(acc)
    b, h, n_q, d = qp.shape
    n_k, dv = kp.shape[2], vp.shape[-1]
    bq, bk, mq = layout.block_q, layout.block_k, layout.num_q_blocks

    kept = layout.to_dense()
    summary = tail.prepare(key_block_sums(kp, vp, bk, tail.second_moments), kept.to(acc))
    q_blocks, k_blocks, v_blocks = to_blocks(qp, bq), to_blocks(kp, bk), to_blocks(vp, bk)
    key_valid = (torch.arange(layout.num_k_blocks * bk, device=q.device) < n_k).view(-1, bk)
    key_block = torch.arange(n_k, device=q.device) // bk
    key_counts = layout.k_block_sizes().to(acc)
    index, slot_valid = layout.kv_indices.long(), layout.valid_mask()

    out = torch.empty(b, h, mq, bq, dv, dtype=acc, device=q.device)
    lse = torch.empty(b, h, mq, bq, dtype=acc, device=q.device)
    stats = {name: torch.empty_like(lse) for name in BLOCK_STAT_NAMES} if with_stats else {}
    step = _blocks_per_chunk(layout, d, dv, torch.finfo(acc).bits // 8, with_stats, chunk_bytes)
    for start in range(0, mq, step):
        rows = slice(start, min(start + step, mq))
        idx = index[:, :, rows]
        valid = (slot_valid[:, :, rows, :, None] & key_valid[idx]).flatten(-2).unsqueeze(-2)
        z = scale * torch.matmul(q_blocks[:, :, rows], _gather_blocks(k_blocks, idx).mT)
        o_kept, lse_kept = softmax_part(z, _gather_blocks(v_blocks, idx), valid)
        chunk_tail = tail.tokens(summary, q_blocks[:, :, rows], rows, kept[:, :, rows], scale)
        o, part_lse = merge_tokens(o_kept, lse_kept, chunk_tail.logits, chunk_tail.values)
        out[:, :, rows], lse[:, :, rows] = o, part_lse
        if with_stats:
            chunk = _chunk_stats(
                q_blocks[:, :, rows],
                kp,
                kept[:, :, rows],
                key_block,
                key_counts,
                chunk_tail,
                part_lse,
                scale,
            )
            for name, value in chunk.items():
                stats[name][:, :, rows] = value

    def restore(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(b, h, mq * bq, *x.shape[4:])[:, :, :n_q]
        return unpermute_tokens(x, layout.q_perm)

    return restore(out), restore(lse), {name: restore(s) for name, s in stats.items()}

"""Pooled block scoring, block-topk and block-topp, and every block method through attention()."""

import math

import pytest
import torch

import tailattn
from tailattn.select import BlockTopK, BlockTopP, pool_blocks, pooled_scores


def test_pool_blocks_is_the_block_mean_with_a_ragged_last_block(skewed):
    q, _, _ = skewed(seed=1, n=100, d=8)
    pooled = pool_blocks(q, 32)
    assert pooled.shape == (1, 2, 4, 8)
    for m, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 96), (96, 100)]):
        assert (pooled[:, :, m] - q[:, :, lo:hi].mean(2)).abs().max() < 1e-14


def test_pooled_scores_match_the_definition(skewed):
    q, k, _ = skewed(seed=2, n=90, d=8)
    scores = pooled_scores(q, k, 0.3, 16, 32)
    qbar, kbar = pool_blocks(q, 16), pool_blocks(k, 32)
    counts = torch.tensor([32.0, 32.0, 26.0], dtype=torch.float64)
    for m in range(qbar.shape[2]):
        logits = 0.3 * (kbar[0, 1] @ qbar[0, 1, m]) + torch.log(counts)
        assert (scores[0, 1, m] - torch.softmax(logits, 0)).abs().max() < 1e-14
    assert (scores.sum(-1) - 1).abs().max() < 1e-14


@pytest.mark.parametrize("keep", [1e-3, 0.2, 0.5, 0.99, 1.0])
def test_block_topk_budget_and_order(skewed, keep):
    q, k, _ = skewed(seed=3, n=300, d=8)
    layout = BlockTopK(keep, 32, 32)(q, k, scale=0.35, grid=None)
    mk = 10
    assert bool((layout.kv_counts == min(mk, max(1, math.ceil(keep * mk)))).all())
    kept = layout.to_dense()
    scores = pooled_scores(q, k, 0.35, 32, 32)
    low = scores.masked_fill(~kept, math.inf).amin(-1)
    high = scores.masked_fill(kept, -math.inf).amax(-1)
    assert bool((low >= high).all())


@pytest.mark.parametrize("p", [0.3, 0.7, 0.95, 1.0])
def test_block_topp_is_the_smallest_set_reaching_p(skewed, p):
    q, k, _ = skewed(seed=4, n=256, d=8)
    layout = BlockTopP(p, 16, 16)(q, k, scale=0.35, grid=None)
    scores = pooled_scores(q, k, 0.35, 16, 16)
    kept = layout.to_dense()
    mass = (scores * kept).sum(-1)
    smallest = scores.masked_fill(~kept, math.inf).amin(-1)
    assert bool(((mass >= p - 1e-12) | kept.all(-1)).all())
    assert bool((mass - smallest < p).all())  # dropping its smallest block falls short of p


def test_block_sizes_are_validated():
    for bad in (0, -64):
        with pytest.raises(ValueError, match="block_q must be a positive integer"):
            BlockTopK(0.1, block_q=bad)
    for bad in (64.0, True, "64"):
        with pytest.raises(TypeError, match="block_k must be a positive integer"):
            BlockTopP(0.9, block_k=bad)
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="block_k must be a positive integer"):
        tailattn.attention(q, q, q, "block-topk(block_k=0)+uta", keep=0.5)


SELECTIONS = ["block-topk", "block-topp", "svg2(iterations=5)", "radial", "window"]
BLOCK_TAILS = ["drop", "uta", "blocks", "moment"]


@pytest.mark.parametrize("tail", BLOCK_TAILS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_every_selection_composes_with_every_tail(skewed, selection, tail):
    q, k, v = skewed(seed=5, n=4 * 6 * 8, d=16)
    keep = None if selection == "block-topp" else 0.4
    out, info = tailattn.attention(
        q, k, v, f"{selection}+{tail}", keep=keep, grid=(4, 6, 8), return_info=True, block_q=32
    )
    layout = info["layout"]
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert info["density"] == pytest.approx(layout.density())
    assert info["lse"].shape == (1, 2, 192)
    assert 0 < info["recall"] <= 1 + 1e-12
    assert set(info["per_head"]) >= {"recall", "budget", "tail_mass_error", "implied_tv"}
    if selection != "block-topp":
        dense = tailattn.attention(q, k, v, f"{selection}+{tail}", keep=1.0, grid=(4, 6, 8))
        assert (dense - tailattn.full_attention(q, k, v)).abs().max() < 1e-12


def test_tails_reduce_block_topk_error_on_skewed_attention(skewed):
    """Not a theorem, a sanity property of the synthetic skewed data: aggregating the tail
    beats dropping it at the same layout."""
    q, k, v = skewed(seed=6, n=512, d=16)
    ref = tailattn.full_attention(q, k, v)
    errors = {
        tail: tailattn.metrics.mse(
            tailattn.attention(q, k, v, f"block-topk+{tail}", keep=0.25, block_q=32, block_k=32),
            ref,
        )
        for tail in BLOCK_TAILS
    }
    assert errors["uta"] < errors["drop"]
    assert errors["blocks"] < errors["drop"]


def test_bnhd_layout_and_low_precision(skewed):
    q, k, v = skewed(seed=7, n=256, d=16)
    ref = tailattn.attention(q, k, v, "block-topk+uta", keep=0.3, block_q=64, block_k=64)
    as_bnhd = [x.transpose(1, 2).float() for x in (q, k, v)]
    out = tailattn.attention(
        *as_bnhd, "block-topk+uta", keep=0.3, layout="bnhd", block_q=64, block_k=64
    )
    assert out.dtype == torch.float32 and out.shape == as_bnhd[0].shape
    assert (out.transpose(1, 2).double() - ref).abs().max() < 1e-5
    half = tailattn.attention(*(x.bfloat16() for x in (q, k, v)), "block-topk+blocks", keep=0.3)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_block_tail_names_are_their_own_registry_entries():
    assert set(tailattn.registry.tails("block")) == {"drop", "uta", "blocks", "moment"}
    with pytest.raises(ValueError, match="tail 'bins' works with token selections only"):
        tailattn.registry.bind("block-topk+bins4", keep=0.1)
    with pytest.raises(ValueError, match="tail 'blocks' works with block selections only"):
        tailattn.registry.bind("topk+blocks", keep=0.1)

"""In-loop skipping: blasst (fixed threshold) and recall (fixed recall, ours)."""

import pytest
import torch

import tailattn
from tailattn.reference import block_attention
from tailattn.select import Blasst, Recall
from tailattn.tails import BlockDrop, BlockUTA, PooledBlocks
from video_like import grid_qkv

GRID = (4, 8, 8)
ARGS = {"block_q": 32, "block_k": 32}


@pytest.fixture(scope="module")
def qkv():
    return grid_qkv(GRID, seed=1)


def test_blasst_at_tiny_lam_is_full_attention(qkv):
    q, k, v = qkv
    full, full_lse = tailattn.full_attention(q, k, v, return_lse=True)
    out, info = tailattn.attention(q, k, v, "blasst", lam=1e-30, return_info=True, **ARGS)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info["lse"], full_lse, rtol=1e-10, atol=1e-12)
    assert info["density"] == 1.0 and abs(info["recall"] - 1.0) < 1e-12


@pytest.mark.parametrize("r", [0.9, 0.95, 0.99])
def test_recall_guarantee(qkv, r):
    q, k, v = qkv
    _, info = tailattn.attention(q, k, v, "recall", recall=r, return_info=True, **ARGS)
    assert info["density"] < 1.0 or r == 0.99  # it does skip on this data
    assert info["target_recall"] == r
    # per query, over all heads: the exact recall meets the target, the bound holds
    lse_kept = info["lse"]
    full_lse = tailattn.full_attention(q, k, v, return_lse=True)[1]
    exact = torch.exp(lse_kept - full_lse)
    assert float(exact.min()) >= r - 1e-9
    assert abs(float(exact.mean()) - info["recall"]) < 1e-12
    assert info["recall_bound"] <= info["recall"] + 1e-12


@pytest.mark.parametrize("r", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("bound", ["max", "exact"])
def test_recall_guarantee_on_skewed_attention(skewed, r, bound):
    q, k, v = skewed(seed=2, n=320)
    spec = f"recall(bound={bound})"
    _, info = tailattn.attention(q, k, v, spec, recall=r, return_info=True, **ARGS)
    full_lse = tailattn.full_attention(q, k, v, return_lse=True)[1]
    assert float(torch.exp(info["lse"] - full_lse).min()) >= r - 1e-9


def test_exact_accounting_skips_more_and_meets_the_target(qkv):
    q, k, v = qkv
    full_lse = tailattn.full_attention(q, k, v, return_lse=True)[1]
    density = {}
    for bound in ("max", "exact"):
        spec = f"recall(recall=0.9, bound={bound})"
        _, info = tailattn.attention(q, k, v, spec, return_info=True, **ARGS)
        density[bound] = info["density"]
        assert float(torch.exp(info["lse"] - full_lse).min()) >= 0.9 - 1e-9
        # the in-loop bound is exact with exact accounting
        if bound == "exact":
            assert abs(info["recall_bound"] - info["recall"]) < 1e-9
    assert density["exact"] < density["max"]


@pytest.mark.parametrize(
    "spec, tail",
    [
        ("blasst(lam=0.05)", BlockDrop()),
        ("recall+uta", BlockUTA()),
        ("blasst(lam=0.05)+blocks", PooledBlocks()),
    ],
)
def test_loop_output_is_block_attention_over_its_decisions(qkv, spec, tail):
    q, k, v = qkv
    out, info = tailattn.attention(q, k, v, spec, return_info=True, **ARGS)
    layout = info["layout"]
    assert info["density"] < 1.0
    want, want_lse, _ = block_attention(q, k, v, layout, tail, 32**-0.5)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info["lse"], want_lse, rtol=1e-10, atol=1e-12)


def test_blasst_skip_rule_and_monotone_density(qkv):
    q, k, v = qkv
    densities = []
    for lam in (1e-6, 1e-3, 1e-2, 1e-1):
        _, info = tailattn.attention(q, k, v, "blasst", lam=lam, return_info=True, **ARGS)
        densities.append(info["density"])
        # the first tile of every query tile is always computed
        assert bool(info["layout"].to_dense()[..., 0].all())
    assert densities == sorted(densities, reverse=True) and densities[-1] < densities[0]


def test_tails_lower_the_error_of_skipping(qkv):
    q, k, v = qkv
    full = tailattn.full_attention(q, k, v)
    errors = {
        spec: tailattn.metrics.mse(tailattn.attention(q, k, v, spec, lam=0.1, **ARGS), full)
        for spec in ("blasst", "blasst+uta", "blasst+blocks")
    }
    assert errors["blasst+blocks"] < errors["blasst"] and errors["blasst+uta"] < errors["blasst"]


def test_bad_inputs(qkv):
    for r in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match=r"recall must be in \(0, 1\]"):
            Recall(recall=r)
    for lam in (0.0, -1e-3):
        with pytest.raises(ValueError, match="lam must be positive"):
            Blasst(lam=lam)
    with pytest.raises(TypeError, match="lam"):
        Blasst(lam="small")
    q, k, v = qkv
    with pytest.raises(ValueError, match="recall"):
        tailattn.attention(q, k, v, "recall", recall=2.0)
    with pytest.raises(ValueError, match="bound must be"):
        Recall(bound="loose")
    with pytest.raises(ValueError, match="takes no parameter 'keep'"):
        tailattn.attention(q, k, v, "blasst", keep=0.1)


def test_layout_of_sampled_query_tiles_matches_the_full_walk(qkv):
    q, k, v = qkv
    sel = Recall(recall=0.9, bound="exact", block_q=32, block_k=32)
    full = sel.layout(q, k, v, scale=32**-0.5).to_dense()
    blocks = torch.tensor([1, 5, 6])
    part = sel.layout(q, k, v, scale=32**-0.5, query_blocks=blocks).to_dense()
    assert torch.equal(part[:, :, blocks], full[:, :, blocks])
    assert bool(part[:, :, [0, 2, 3, 4, 7]].all())

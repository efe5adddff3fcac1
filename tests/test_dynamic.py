"""In-loop skipping: blasst (fixed threshold) and recall (fixed recall, ours)."""

import math

import pytest
import torch

import tailattn
from tailattn.reference import block_attention
from tailattn.select import Blasst, Recall
from tailattn.select.dynamic import FATE_UNSEEN, key_tiles
from tailattn.tails import BlockDrop, BlockUTA, PooledBlocks
from video_like import grid_qkv

GRID = (4, 8, 8)
ARGS = {"block_q": 32, "block_k": 32}


def tiled_qkv(n=300, d=32, heads=2, seed=0, tile=64, focus=1.5, dtype=torch.float64):
    """Keys close to one centre per tile of ``tile`` tokens (small tile radius), queries drawn
    to their own tile's centre (weight ``focus``) and to one other tile's (0.6): a few tiles
    hold most of a row's mass and the Cauchy-Schwarz bound is tight enough to skip QK."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, math.ceil(n / tile), d, generator=gen, dtype=dtype)
    own = torch.arange(n) // tile
    other = torch.randint(0, centers.shape[1], (n,), generator=gen)
    k = centers[:, own] + 0.15 * torch.randn(heads, n, d, generator=gen, dtype=dtype)
    q = focus * centers[:, own] + 0.6 * centers[:, other]
    q = q + 0.3 * torch.randn(heads, n, d, generator=gen, dtype=dtype)
    v = torch.randn(heads, n, d, generator=gen, dtype=dtype)
    return q[None], k[None], v[None]


def exact_recall(q, k, kept_tiles, block_q, block_k, scale):
    """Exact kept mass per query row (float64 logits) of a (B, H, Mq, Mk) bool tile mask."""
    n_q, n_k = q.shape[2], k.shape[2]
    z = scale * q.double() @ k.double().mT
    kept = kept_tiles[:, :, torch.arange(n_q) // block_q][..., torch.arange(n_k) // block_k]
    return torch.exp(torch.logsumexp(z.masked_fill(~kept, -math.inf), -1) - z.logsumexp(-1))


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
def test_recall_guarantee_on_skewed_attention(skewed, r):
    q, k, v = skewed(seed=2, n=320)
    _, info = tailattn.attention(q, k, v, "recall", recall=r, return_info=True, **ARGS)
    full_lse = tailattn.full_attention(q, k, v, return_lse=True)[1]
    assert float(torch.exp(info["lse"] - full_lse).min()) >= r - 1e-9


@pytest.mark.parametrize("r", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recall_skips_qk_on_tight_tiles_and_keeps_the_guarantee(r, dtype):
    q, k, v = (x.to(dtype) for x in tiled_qkv(seed=4))
    sel = Recall(recall=r, block_q=64, block_k=64)
    loop = sel.walk(q, k, v, 32**-0.5)
    assert bool((loop.fate == FATE_UNSEEN).any())  # the a priori bound skips some QK
    recall = exact_recall(q, k, loop.kept, 64, 64, 32**-0.5)[..., : q.shape[2]]
    assert float(recall.min()) >= r
    # the loop's own bound l / (l + sigma) is below the exact recall
    bound = 1.0 / (1.0 + loop.skipped.flatten(2, 3)[..., : q.shape[2]].double())
    assert bool((bound <= recall + 1e-6).all())
    spec = f"recall(recall={r}, block_q=64, block_k=64)"
    _, info = tailattn.attention(q, k, v, spec, return_info=True)
    assert info["qk_density"] < 1.0 and info["density"] < info["qk_density"]


def test_key_tiles_bound_every_logit():
    q, k, _ = tiled_qkv(n=200, seed=5)
    tiles = key_tiles(k, 64)
    blocks = torch.arange(200) // 64
    dots = q @ k.mT  # (B, H, Nq, Nk)
    upper = q @ tiles.mean.mT + q.norm(dim=-1, keepdim=True) * tiles.radius.unsqueeze(-2)
    assert bool((dots <= upper[..., blocks] + 1e-12).all())
    assert torch.equal(tiles.sizes, torch.tensor([64.0, 64.0, 64.0, 8.0], dtype=k.dtype))


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
    with pytest.raises(ValueError, match="takes no parameter 'keep'"):
        tailattn.attention(q, k, v, "blasst", keep=0.1)


def test_layout_of_sampled_query_tiles_matches_the_full_walk(qkv):
    q, k, v = qkv
    sel = Recall(recall=0.9, block_q=32, block_k=32)
    full = sel.layout(q, k, v, scale=32**-0.5).to_dense()
    blocks = torch.tensor([1, 5, 6])
    part = sel.layout(q, k, v, scale=32**-0.5, query_blocks=blocks).to_dense()
    assert torch.equal(part[:, :, blocks], full[:, :, blocks])
    assert bool(part[:, :, [0, 2, 3, 4, 7]].all())

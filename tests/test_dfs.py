"""DFSAttn: hierarchical tile->block scores, curve reordering, the mask cache over steps."""

import math
import os

import pytest
import torch

import tailattn
from tailattn.select import DFS, DFSState, tile_block_scores
from tailattn.select.curves import grid_order
from video_like import grid_qkv

GRID = (4, 8, 8)


def test_tile_block_scores_sum_tile_probabilities():
    q, k, _ = grid_qkv((2, 5, 7), seed=1)  # 70 tokens: ragged last tile and block
    scale, tile, bq, bk = 0.2, 5, 10, 15
    got = tile_block_scores(q, k, scale, tile, bq, bk, chunk_bytes=1)
    tiles = [slice(i, min(i + tile, 70)) for i in range(0, 70, tile)]
    qt = torch.stack([q[:, :, s].mean(2) for s in tiles], 2)
    kt = torch.stack([k[:, :, s].mean(2) for s in tiles], 2)
    sizes = torch.tensor([s.stop - s.start for s in tiles], dtype=q.dtype)
    p = torch.softmax(scale * qt @ kt.mT + sizes.log(), dim=-1)  # (B, H, 14, 14)
    want = torch.zeros(1, 2, 7, 5, dtype=q.dtype)
    for a in range(14):
        for b in range(14):
            want[:, :, a * tile // bq, b * tile // bk] += p[:, :, a, b]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(got.sum(-1), torch.full((7,), 2.0).double())  # 2 tiles a block


def test_layout_keeps_top_scored_blocks_in_curve_order():
    q, k, _ = grid_qkv(GRID, seed=2)
    sel = DFS(keep=0.25, curve="gilbert", tile=8, block_q=32, block_k=32)
    layout = sel(q, k, scale=0.2, grid=GRID)
    perm = grid_order(GRID, "gilbert")[0]
    assert torch.equal(layout.q_perm, perm) and torch.equal(layout.kv_perm, perm)
    scores = tile_block_scores(q[:, :, perm], k[:, :, perm], 0.2, 8, 32, 32)
    kept = layout.to_dense()
    assert bool((kept.sum(-1) == 2).all())
    low = scores.masked_fill(~kept, math.inf).amin(-1)
    high = scores.masked_fill(kept, -math.inf).amax(-1)
    assert bool((low >= high).all())


@pytest.mark.parametrize("tail", ["", "+uta", "+blocks", "+moment"])
def test_keep_one_is_full_attention(tail):
    q, k, v = grid_qkv(GRID, seed=3, text_tokens=5)
    full = tailattn.full_attention(q, k, v)
    out = tailattn.attention(
        q, k, v, "dfs(text_tokens=5)" + tail, keep=1.0, grid=GRID, block_q=32, block_k=32
    )
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-12)


def test_curves_raise_block_recall_over_row_major():
    q, k, v = grid_qkv(GRID, seed=4)
    recall = {}
    for curve in ("none", "hilbert", "gilbert"):
        _, info = tailattn.attention(
            q,
            k,
            v,
            f"dfs(curve={curve})",
            keep=0.125,
            grid=GRID,
            block_q=32,
            block_k=32,
            return_info=True,
        )
        recall[curve] = info["recall"]
    assert recall["hilbert"] > recall["none"] + 0.05
    assert recall["gilbert"] > recall["none"] + 0.05


def test_uta_tail_lowers_the_error():
    q, k, v = grid_qkv(GRID, seed=5)
    full = tailattn.full_attention(q, k, v)
    args = {"keep": 0.125, "grid": GRID, "block_q": 32, "block_k": 32}
    drop = tailattn.metrics.mse(tailattn.attention(q, k, v, "dfs", **args), full)
    uta = tailattn.metrics.mse(tailattn.attention(q, k, v, "dfs+uta", **args), full)
    assert uta < drop


def test_mask_cache_schedule_dense_rebuild_reuse():
    q, k, _ = grid_qkv(GRID, seed=6)
    sel = DFS(
        curve="hilbert", tile=8, block_q=32, block_k=32, warmup=2, rebuild=(2, 4), keeps=(0.5, 0.25)
    )
    state = sel.new_state()
    layouts = [sel(q, k, scale=0.2, grid=GRID, state=state) for _ in range(6)]
    assert [(s, a) for s, a, _ in state.history] == [
        (0, "dense"),
        (1, "dense"),
        (2, "rebuild"),
        (3, "reuse"),
        (4, "rebuild"),
        (5, "reuse"),
    ]
    assert [kp for *_, kp in state.history] == [None, None, 0.5, 0.5, 0.25, 0.25]
    assert layouts[0].density() == 1.0 and layouts[1].density() == 1.0
    assert layouts[3] is layouts[2] and layouts[5] is layouts[4]
    assert layouts[2].density() == 0.5 and layouts[4].density() == 0.25
    # a reused mask is the one built at the rebuild step, even though q and k changed
    q2, k2, _ = grid_qkv(GRID, seed=7)
    state.step = 5
    assert sel(q2, k2, scale=0.2, grid=GRID, state=state) is layouts[4]
    assert state.history[-1] == (5, "reuse", 0.25)
    # moving back to a step of another keep ratio rebuilds instead of serving the stale mask
    state.step = 3
    assert sel(q2, k2, scale=0.2, grid=GRID, state=state).density() == 0.5
    assert state.history[-1] == (3, "rebuild", 0.5)


def test_mask_cache_rebuilds_when_keep_changes_and_defaults():
    q, k, _ = grid_qkv(GRID, seed=8)
    state = DFSState()
    a = DFS(keep=0.5, tile=8, block_q=32, block_k=32, warmup=0, rebuild=(0,), keeps=(0.5,))
    b = DFS(keep=0.25, tile=8, block_q=32, block_k=32, warmup=0, rebuild=(0,), keeps=(0.5,))
    a(q, k, scale=0.2, grid=GRID, state=state)
    a(q, k, scale=0.2, grid=GRID, state=state)
    b(q, k, scale=0.2, grid=GRID, state=state)
    assert [x[1:] for x in state.history] == [("rebuild", 0.5), ("reuse", 0.5), ("rebuild", 0.25)]
    default = DFS()
    assert (default.warmup, default.rebuild, default.keeps) == (12, (12, 24, 36), (0.3, 0.2, 0.1))
    assert [default.keep_at(s) for s in (12, 23, 24, 36, 49)] == [0.3, 0.3, 0.2, 0.1, 0.1]
    spec = tailattn.registry.bind("dfs(rebuild=2/4, keeps=0.5/0.25, warmup=2)").selection
    assert spec.rebuild == (2, 4) and spec.keeps == (0.5, 0.25)


def test_state_through_attention_matches_fresh_selection_at_rebuild():
    q, k, v = grid_qkv(GRID, seed=9)
    args = {"grid": GRID, "block_q": 32, "block_k": 32, "warmup": 1, "rebuild": "1", "keeps": 0.25}
    state = DFSState()
    dense = tailattn.attention(q, k, v, "dfs+uta", state=state, **args)
    torch.testing.assert_close(dense, tailattn.full_attention(q, k, v), rtol=1e-10, atol=1e-12)
    sparse = tailattn.attention(q, k, v, "dfs+uta", state=state, **args)
    fresh = tailattn.attention(q, k, v, "dfs+uta", keep=0.25, **{**args, "keeps": 0.25})
    torch.testing.assert_close(sparse, fresh)


def test_bad_inputs():
    q, k, v = grid_qkv(GRID, seed=10)
    with pytest.raises(ValueError, match="needs grid"):
        tailattn.attention(q, k, v, "dfs", keep=0.1)
    with pytest.raises(ValueError, match="grid"):
        tailattn.attention(q, k, v, "dfs", keep=0.1, grid=(4, 8, 9))
    with pytest.raises(ValueError, match="text tokens"):
        tailattn.attention(q, k, v, "dfs(text_tokens=3)", keep=0.1, grid=GRID)
    with pytest.raises(ValueError, match="keep"):
        tailattn.attention(q, k, v, "dfs", keep=1.5, grid=GRID)
    with pytest.raises(ValueError, match="tile must divide"):
        DFS(tile=24)
    with pytest.raises(ValueError, match="same, non-zero length"):
        DFS(rebuild="10/20", keeps="0.3")
    with pytest.raises(ValueError, match="sequence such as"):
        DFS(rebuild="12/x", keeps="0.3/0.2")
    with pytest.raises(ValueError, match="sequence such as"):
        DFS(rebuild=True, keeps=0.3)
    with pytest.raises(ValueError, match="increasing"):
        DFS(rebuild=(20, 10), keeps=(0.3, 0.2))
    with pytest.raises(TypeError, match="DFSState"):
        DFS(keep=0.1)(q, k, scale=0.2, grid=GRID, state=object())


def test_state_reused_with_other_grid_or_heads_raises():
    sel = DFS(tile=8, block_q=32, block_k=32, warmup=0, rebuild=(0,), keeps=(0.5,))
    q, k, _ = grid_qkv(GRID, seed=11)
    state = sel.new_state()
    sel(q, k, scale=0.2, grid=GRID, state=state)
    with pytest.raises(ValueError, match="one DFSState per attention layer"):
        sel(q[:, :1], k[:, :1], scale=0.2, grid=GRID, state=state)
    with pytest.raises(ValueError, match="one DFSState per attention layer"):
        sel(q, k, scale=0.2, grid=(8, 4, 8), state=state)
    other = DFS(curve="none", tile=8, block_q=32, block_k=32, warmup=0, rebuild=(0,), keeps=(0.5,))
    with pytest.raises(ValueError, match="one DFSState per attention layer"):
        other(q, k, scale=0.2, grid=GRID, state=state)
    assert [a for _, a, _ in state.history] == ["rebuild"]


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
def test_dfs_layout_runs_on_the_fused_kernel():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.float().to(device) for x in grid_qkv((2, 8, 8), seed=12))
    args = {"keep": 0.5, "grid": (2, 8, 8), "block_q": 64, "block_k": 64}
    ref = tailattn.attention(q, k, v, "dfs+uta", backend="reference", **args)
    out = tailattn.attention(q, k, v, "dfs+uta", backend="triton", **args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

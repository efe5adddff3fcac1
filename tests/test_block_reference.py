"""The block reference executor and the block tails against brute force, in float64."""

import math

import pytest
import torch

import tailattn
from tailattn.layout import BlockLayout
from tailattn.permute import invert_permutation
from tailattn.reference import block_attention, evaluate_chunk, iter_logits
from tailattn.tails import UTA, BlockDrop, BlockMoment, BlockUTA, Moment, PooledBlocks

TAILS = {"drop": BlockDrop(), "uta": BlockUTA(), "blocks": PooledBlocks(), "moment": BlockMoment()}


def random_layout(b, h, n_q, n_k, bq, bk, p=0.35, seed=0, perms=True):
    gen = torch.Generator().manual_seed(seed)
    mq, mk = math.ceil(n_q / bq), math.ceil(n_k / bk)
    mask = torch.rand(b, h, mq, mk, generator=gen) < p
    first = torch.randint(0, mk, (b, h, mq, 1), generator=gen)
    mask.scatter_(-1, first, True)  # at least one kept block, not always block 0
    q_perm = torch.stack([torch.randperm(n_q, generator=gen) for _ in range(b * h)])
    kv_perm = torch.randperm(n_k, generator=gen)  # one shared (N,) permutation
    if not perms:
        return BlockLayout.from_dense(mask, n_q, n_k, bq, bk)
    return BlockLayout.from_dense(mask, n_q, n_k, bq, bk, q_perm.view(b, h, n_q), kv_perm)


def kept_tokens(layout):
    """(B, H, Nq, Nk) bool kept mask in ORIGINAL token order, from the permuted token mask."""
    mask = layout.token_mask()
    b, h = layout.batch_heads
    inv_q = layout.inverse_q_perm()
    inv_k = layout.inverse_kv_perm()
    if inv_q is not None:
        inv_q = inv_q.expand(b, h, layout.n_q) if inv_q.ndim == 1 else inv_q
        mask = mask.gather(2, inv_q.unsqueeze(-1).expand(b, h, layout.n_q, layout.n_k))
    if inv_k is not None:
        inv_k = inv_k.expand(b, h, layout.n_k) if inv_k.ndim == 1 else inv_k
        mask = mask.gather(3, inv_k.unsqueeze(2).expand(b, h, layout.n_q, layout.n_k))
    return mask


def key_groups(layout, b, h, dropped):
    """Original key ids of every dropped key block of one query (ORIGINAL order ids)."""
    perm = layout.kv_perm
    order = torch.arange(layout.n_k) if perm is None else (perm if perm.ndim == 1 else perm[b, h])
    groups = {}
    for pos in range(layout.n_k):
        key = int(order[pos])
        if dropped[key]:
            groups.setdefault(pos // layout.block_k, []).append(key)
    return list(groups.values())


def brute_force(q, k, v, layout, tail):
    """Per query: exact softmax over its kept keys plus the tail's tokens, written out."""
    s = 1 / math.sqrt(q.shape[-1])
    kept = kept_tokens(layout)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                z = (k[b, h] @ q[b, h, i]) * s
                keep = kept[b, h, i]
                logits, values = list(z[keep]), list(v[b, h][keep])
                dropped = ~keep
                if tail in ("uta", "moment") and dropped.any():
                    zd, vd = z[dropped], v[b, h][dropped]
                    gain = 1 + ((zd - zd.mean()) ** 2).mean() / 2 if tail == "moment" else 1
                    cov = ((zd - zd.mean())[:, None] * vd).mean(0) if tail == "moment" else 0
                    logits.append(zd.mean() + math.log(len(zd)) + math.log(gain))
                    values.append(vd.mean(0) + cov / gain)
                if tail == "blocks":
                    for group in key_groups(layout, b, h, dropped):
                        logits.append(z[group].mean() + math.log(len(group)))
                        values.append(v[b, h, group].mean(0))
                w = torch.softmax(torch.stack(logits), 0)
                out[b, h, i] = (w[:, None] * torch.stack(values)).sum(0)
    return out


def qkv(seed, b=1, h=2, n_q=70, n_k=90, d=8, dv=6):
    gen = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(b, h, n_q, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, n_k, d, generator=gen, dtype=torch.float64) + 0.3
    v = torch.randn(b, h, n_k, dv, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize(("bq", "bk", "perms"), [(16, 16, True), (8, 32, True), (32, 8, False)])
def test_random_layouts_match_brute_force(tail, bq, bk, perms):
    q, k, v = qkv(seed=bq + bk)
    layout = random_layout(1, 2, 70, 90, bq, bk, seed=bk, perms=perms)  # ragged last blocks
    out, lse, _ = block_attention(q, k, v, layout, TAILS[tail], 1 / math.sqrt(8))
    assert out.shape == (1, 2, 70, 6) and lse.shape == (1, 2, 70)
    assert (out - brute_force(q, k, v, layout, tail)).abs().max() < 1e-12


@pytest.mark.parametrize("tail", list(TAILS))
def test_keep_one_equals_full_attention(tail, skewed):
    q, k, v = skewed(seed=7, b=2, h=2, n=150, d=16)
    full = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    layout = BlockLayout.from_dense(full, 150, 150, 64, 64, kv_perm=torch.randperm(150))
    out, lse, _ = block_attention(q, k, v, layout, TAILS[tail], 0.25)
    ref, ref_lse = tailattn.full_attention(q, k, v, 0.25, return_lse=True)
    assert (out - ref).abs().max() < 1e-13
    assert (lse - ref_lse).abs().max() < 1e-12
    api = tailattn.attention(q, k, v, f"block-topk+{tail}", keep=1.0, scale=0.25, block_q=64)
    assert (api - ref).abs().max() < 1e-13


def test_uta_with_one_kept_block_is_eq14_over_the_dropped_tokens():
    q, k, v = qkv(seed=11, h=1, n_q=48, n_k=80)
    gen = torch.Generator().manual_seed(3)
    chosen = torch.randint(0, 5, (1, 1, 3, 1), generator=gen, dtype=torch.int32)
    layout = BlockLayout(chosen, torch.ones(1, 1, 3, dtype=torch.int32), 48, 80, 16, 16)
    out, _, _ = block_attention(q, k, v, layout, BlockUTA(), 0.5)
    for i in range(48):
        j = int(chosen[0, 0, i // 16, 0])
        kept = torch.zeros(80, dtype=torch.bool)
        kept[16 * j : 16 * j + 16] = True
        z = 0.5 * (k[0, 0] @ q[0, 0, i])
        z_tail = z[~kept].mean() + math.log(64)  # Eq. 13
        num = (torch.exp(z[kept])[:, None] * v[0, 0, kept]).sum(0)
        num = num + torch.exp(z_tail) * v[0, 0, ~kept].mean(0)
        den = torch.exp(z[kept]).sum() + torch.exp(z_tail)  # Eq. 14
        assert (out[0, 0, i] - num / den).abs().max() < 1e-13


def test_blocks_tail_with_block_size_one_is_exact():
    q, k, v = qkv(seed=12, n_q=40, n_k=37)
    layout = random_layout(1, 2, 40, 37, 8, 1, p=0.2, seed=4)
    out, lse, _ = block_attention(q, k, v, layout, PooledBlocks(), 0.3)
    ref, ref_lse = tailattn.full_attention(q, k, v, 0.3, return_lse=True)
    assert (out - ref).abs().max() < 1e-13
    assert (lse - ref_lse).abs().max() < 1e-12
    dropped, _, _ = block_attention(q, k, v, layout, BlockDrop(), 0.3)
    assert (dropped - ref).abs().max() > 1e-3  # the tail is what makes it exact


@pytest.mark.parametrize(("tail", "token_tail"), [("uta", UTA()), ("moment", Moment())])
def test_block_tails_equal_token_tails_with_the_same_kept_set(tail, token_tail):
    """uta and moment only need sums over D, so the block forms equal the token forms; the
    per-query statistics agree with the oracle's on the same kept mask."""
    q, k, v = qkv(seed=13, b=2, n_q=50, n_k=60)
    layout = random_layout(2, 2, 50, 60, 16, 8, seed=5)
    out, lse, stats = block_attention(q, k, v, layout, TAILS[tail], 0.4, with_stats=True)
    kept = kept_tokens(layout)
    z = next(iter_logits(q, k, 0.4, torch.float64))[1]
    ref = evaluate_chunk(z, v, lambda _: kept, token_tail)
    assert (out - ref.out).abs().max() < 1e-12
    assert (lse - ref.lse).abs().max() < 1e-12
    for name, value in stats.items():
        assert (value - ref.stats[name]).abs().max() < 1e-12, name


def test_block_stats_against_definitions():
    q, k, v = qkv(seed=14, n_q=40, n_k=50)
    layout = random_layout(1, 2, 40, 50, 8, 16, seed=6)
    _, lse, stats = block_attention(q, k, v, layout, PooledBlocks(), 0.5, with_stats=True)
    kept = kept_tokens(layout)
    z = 0.5 * q @ k.mT
    p = torch.softmax(z, -1)
    assert (stats["recall"] - (p * kept).sum(-1)).abs().max() < 1e-13
    assert (stats["density"] - kept.double().mean(-1)).abs().max() < 1e-15
    assert abs(float(stats["density"].mean()) - layout.density()) < 1e-13
    dropped_blocks = (~layout.to_dense()).sum(-1).double()  # one token per dropped block
    q_block = (invert_permutation(layout.q_perm) // 8).unsqueeze(-1)
    tokens = dropped_blocks.gather(2, q_block.squeeze(-1))
    assert (stats["budget"] - (kept.sum(-1) + tokens) / 50).abs().max() < 1e-13
    for h in range(2):
        for i in range(40):
            groups = key_groups(layout, 0, h, ~kept[0, h, i])
            token_logits = torch.stack([z[0, h, i, g].mean() + math.log(len(g)) for g in groups])
            exact_tail = torch.logsumexp(z[0, h, i, ~kept[0, h, i]], 0)
            error = torch.expm1(torch.logsumexp(token_logits, 0) - exact_tail)
            assert abs(float(stats["tail_mass_error"][0, h, i] - error)) < 1e-12
            implied = z[0, h, i].clone()  # each dropped key gets its block's mean logit
            for g in groups:
                implied[g] = z[0, h, i, g].mean()
            tv = 0.5 * (p[0, h, i] - torch.exp(implied - lse[0, h, i])).abs().sum()
            assert abs(float(stats["implied_tv"][0, h, i] - tv)) < 1e-12


def test_theorem_3_1_at_block_granularity():
    """All dropped keys equal => every dropped logit is equal => uta (and moment) exact."""
    q, k, v = qkv(seed=15, n_q=32, n_k=64)
    kept_blocks = torch.zeros(1, 2, 2, 4, dtype=torch.bool)
    kept_blocks[..., 0, 1] = kept_blocks[..., 1, 3] = True
    layout = BlockLayout.from_dense(kept_blocks, 32, 64, 16, 16)
    k = k.clone()
    k[..., 0:16, :] = k[..., 32:48, :] = k[..., 0:1, :]  # blocks 0 and 2, never kept
    k[..., 16:32, :] = k[..., 0:1, :]  # block 1 is dropped by query block 1
    k[..., 48:64, :] = k[..., 0:1, :]  # block 3 is dropped by query block 0
    ref = tailattn.full_attention(q, k, v)
    for tail in ("uta", "moment"):
        out, _, _ = block_attention(q, k, v, layout, TAILS[tail], 1 / math.sqrt(8))
        assert (out - ref).abs().max() < 1e-13, tail
    out, _, _ = block_attention(q, k, v, layout, BlockDrop(), 1 / math.sqrt(8))
    assert (out - ref).abs().max() > 1e-3


def test_chunking_does_not_change_results():
    q, k, v = qkv(seed=16, n_q=100, n_k=100)
    layout = random_layout(1, 2, 100, 100, 8, 8, seed=7)
    for tail in TAILS.values():
        a = block_attention(q, k, v, layout, tail, 0.3, with_stats=True)
        b = block_attention(q, k, v, layout, tail, 0.3, with_stats=True, chunk_bytes=1)
        assert (a[0] - b[0]).abs().max() < 1e-14
        assert all((a[2][n] - b[2][n]).abs().max() < 1e-13 for n in a[2])


def test_float32_tail_from_offset_keys_stays_accurate():
    """Keys with a large common offset: total-minus-kept sums are centered, so float32 holds."""
    q, k, v = qkv(seed=17, n_q=256, n_k=1024, d=16, dv=16)
    k, v = k + 20.0, v + 50.0
    layout = random_layout(1, 2, 256, 1024, 64, 64, p=0.5, seed=8, perms=False)
    for tail in ("uta", "moment", "blocks"):
        exact, _, _ = block_attention(q, k, v, layout, TAILS[tail], 0.05)
        single, _, _ = block_attention(q.float(), k.float(), v.float(), layout, TAILS[tail], 0.05)
        assert single.dtype == torch.float32
        assert (single.double() - exact).abs().max() < 2e-4, tail


def test_bad_inputs():
    q, k, v = qkv(seed=18, n_q=32, n_k=32)
    layout = random_layout(1, 2, 32, 32, 16, 16, seed=9)
    with pytest.raises(TypeError, match="layout must be a tailattn.layout.BlockLayout"):
        block_attention(q, k, v, layout.to_dense(), BlockUTA(), 0.3)
    with pytest.raises(TypeError, match="tail must be a block tail .*uta"):
        block_attention(q, k, v, layout, UTA(), 0.3)
    with pytest.raises(ValueError, match=r"layout is for \(batch, heads\) = \(1, 2\)"):
        block_attention(q[:, :1], k[:, :1], v[:, :1], layout, BlockUTA(), 0.3)
    with pytest.raises(ValueError, match="layout is for 32 queries and 32 keys"):
        block_attention(q[:, :, :31], k, v, layout, BlockUTA(), 0.3)
    with pytest.raises(ValueError, match="layout is for 32 queries and 32 keys"):
        block_attention(q, k[:, :, :20], v[:, :, :20], layout, BlockUTA(), 0.3)


def test_layouts_with_bad_block_ids_never_reach_the_executor():
    with pytest.raises(ValueError, match="empty query block"):
        mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
        mask[0, 0, 1] = False
        BlockLayout.from_dense(mask, 32, 48, 16, 16)
    counts = torch.ones(1, 1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"key-block ids outside \[0, 3\)"):
        BlockLayout(torch.tensor([[[[0], [3]]]], dtype=torch.int32), counts, 32, 48, 16, 16)
    with pytest.raises(ValueError, match="same key block twice"):
        twice = torch.tensor([[[[1, 1], [0, 2]]]], dtype=torch.int32)
        BlockLayout(twice, 2 * counts, 32, 48, 16, 16)

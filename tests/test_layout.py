"""BlockLayout: validation and conversion round trips."""

import pytest
import torch

from tailattn.layout import BlockLayout, block_sizes
from tailattn.permute import invert_permutation


def random_mask(b=2, h=3, mq=5, mk=7, p=0.4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, mq, mk, generator=gen) < p
    mask[..., 0] = True  # every query block keeps at least one key block
    return mask


def test_dense_round_trip():
    mask = random_mask()
    layout = BlockLayout.from_dense(mask, n_q=5 * 64 - 10, n_k=7 * 64 - 3, block_q=64, block_k=64)
    assert torch.equal(layout.to_dense(), mask)
    assert torch.equal(layout.kv_counts, mask.sum(-1).int())
    again = BlockLayout.from_dense(layout.to_dense(), layout.n_q, layout.n_k, 64, 64)
    assert torch.equal(again.kv_indices, layout.kv_indices)


def test_density_counts_ragged_blocks():
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 1] = True  # 128 queries x 10 keys
    mask[0, 0, 1, 0] = True  # 50 queries x 128 keys
    layout = BlockLayout.from_dense(mask, n_q=178, n_k=138)
    assert layout.density() == pytest.approx((128 * 10 + 50 * 128) / (178 * 138))
    full = BlockLayout.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 178, 138)
    assert full.density() == 1.0


def test_token_mask_matches_blocks():
    mask = random_mask(b=1, h=1, mq=3, mk=4)
    layout = BlockLayout.from_dense(mask, n_q=3 * 16 - 5, n_k=4 * 8 - 1, block_q=16, block_k=8)
    tokens = layout.token_mask()
    assert tokens.shape == (1, 1, 43, 31)
    for i in (0, 15, 16, 42):
        for j in (0, 7, 8, 30):
            assert bool(tokens[0, 0, i, j]) == bool(mask[0, 0, i // 16, j // 8])
    assert torch.equal(layout.token_mask(slice(16, 20)), tokens[:, :, 16:20])


def test_flex_block_mask_matches():
    pytest.importorskip("torch.nn.attention.flex_attention")
    mask = random_mask(b=1, h=2, mq=3, mk=3)
    layout = BlockLayout.from_dense(mask, n_q=300, n_k=300)
    block_mask = layout.to_block_mask()
    dense = block_mask.to_dense()[..., :3, :3].bool()
    assert torch.equal(dense, mask)


def test_block_sizes_and_permutation_inverse():
    assert block_sizes(300, 128).tolist() == [128, 128, 44]
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    inv = invert_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(50))


def test_validation_errors():
    mask = random_mask(b=1, h=1, mq=2, mk=3)
    good = BlockLayout.from_dense(mask, 256, 384)
    with pytest.raises(ValueError, match="key-block ids outside"):
        bad = good.kv_indices.clone()
        bad[0, 0, 0, 0] = 3
        BlockLayout(bad, good.kv_counts, 256, 384)
    with pytest.raises(ValueError, match="same key block twice"):
        idx = torch.zeros(1, 1, 2, 2, dtype=torch.int32)
        BlockLayout(idx, torch.full((1, 1, 2), 2, dtype=torch.int32), 256, 384)
    with pytest.raises(ValueError, match="empty query block"):
        BlockLayout(good.kv_indices, torch.zeros_like(good.kv_counts), 256, 384)
    with pytest.raises(ValueError, match="needs 3"):
        BlockLayout(good.kv_indices, good.kv_counts, 300, 384)
    with pytest.raises(TypeError, match="kv_indices must be an int32"):
        BlockLayout(good.kv_indices.long(), good.kv_counts, 256, 384)
    with pytest.raises(ValueError, match="block_q must be a positive integer"):
        BlockLayout(good.kv_indices, good.kv_counts, 256, 384, block_q=0)
    with pytest.raises(ValueError, match="q_perm is not a permutation"):
        BlockLayout(good.kv_indices, good.kv_counts, 256, 384, q_perm=torch.zeros(256).long())
    with pytest.raises(ValueError, match="kv_perm must have shape"):
        BlockLayout(good.kv_indices, good.kv_counts, 256, 384, kv_perm=torch.arange(10))
    with pytest.raises(ValueError, match="empty query block"):
        BlockLayout.from_dense(torch.zeros(1, 1, 2, 3, dtype=torch.bool), 256, 384)

"""The attention probe of the toy's sparse runs: exact attention over every query row or over
sampled ones (an unbiased estimate of the same mean)."""

import pytest
import torch
import torch.nn.functional as F

from tailattn.toy.probe import AttentionProbe


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_out = torch.nn.ModuleList([torch.nn.Identity()])


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = _Attention()


class _Transformer(torch.nn.Module):
    """Just what the probe hooks: blocks[l].attn1.to_out[0]."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block() for _ in range(layers)])


def _step(probe, dense, sparse, q, k, v, outputs):
    """One diffusion step of two layers: the probe sees q, k, v, then both runs' outputs."""
    for layer, (dense_out, sparse_out) in enumerate(outputs):
        probe.observe(layer, None, (1, 1, 1), q, k, v, None, None)
        dense.blocks[layer].attn1.to_out[0](dense_out)
        sparse.blocks[layer].attn1.to_out[0](sparse_out)
    probe.end_step()


@pytest.mark.parametrize("rows", [None, 5, 64, 100])
def test_local_error_is_the_mean_over_every_or_the_sampled_rows(rows):
    gen = torch.Generator().manual_seed(0)
    b, n, h, d = 2, 64, 2, 8
    q, k, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in "qkv")
    exact = F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)))
    exact = exact.transpose(1, 2).flatten(2)  # (B, N, H * D)
    noise = [torch.randn(b, n, h * d, generator=gen) * (layer + 1) for layer in range(2)]
    dense, sparse = _Transformer(2), _Transformer(2)
    probe = AttentionProbe(dense, sparse, handle=None, rows=rows, seed=7)
    _step(probe, dense, sparse, q, k, v, [(exact, exact + e) for e in noise])
    picked = probe._rows(n, q.device)
    if rows is None or rows >= n:
        assert picked is None
        chosen = torch.arange(n)
    else:
        assert picked.shape == (rows,) and bool((picked.diff() > 0).all())
        assert torch.equal(picked, probe._rows(n, q.device))  # the same rows every call
        chosen = picked
    expected = sum(float((e[:, chosen] ** 2).mean()) for e in noise) / 2
    assert probe.mse_local == [pytest.approx(expected, rel=1e-5)]
    assert probe.mse_vs_dense == [pytest.approx(sum(float((e**2).mean()) for e in noise) / 2)]


def test_sampled_rows_estimate_the_full_mean():
    """Over many seeds the sampled estimate averages to the mean over every row."""
    gen = torch.Generator().manual_seed(1)
    errors = torch.rand(1, 256, 4, generator=gen) ** 4  # skewed per-row errors
    full = float((errors**2).mean())
    estimates = []
    for seed in range(200):
        probe = AttentionProbe(_Transformer(0), _Transformer(0), handle=None, rows=16, seed=seed)
        rows = probe._rows(256, torch.device("cpu"))
        estimates.append(float((errors[:, rows] ** 2).mean()))
    mean = sum(estimates) / len(estimates)
    spread = (sum((x - mean) ** 2 for x in estimates) / len(estimates)) ** 0.5
    assert abs(mean - full) < 4 * spread / len(estimates) ** 0.5


def test_a_recorded_dense_run_stands_in_for_the_dense_transformer():
    gen = torch.Generator().manual_seed(2)
    b, n, h, d = 1, 16, 1, 8
    q, k, v = (torch.randn(b, n, h, d, generator=gen) for _ in "qkv")
    outputs = [torch.randn(b, n, h * d, generator=gen) for _ in range(3)]  # 3 steps, 1 layer
    sparse = _Transformer(1)
    probe = AttentionProbe(None, sparse, None, recorded=[{0: o.bfloat16()} for o in outputs])
    for o in outputs:
        probe.observe(0, None, (1, 1, 1), q, k, v, None, None)
        sparse.blocks[0].attn1.to_out[0](o + 1)
        probe.end_step()
    expected = [float(((o + 1 - o.bfloat16().float()) ** 2).mean()) for o in outputs]
    assert probe.mse_vs_dense == pytest.approx(expected)
    with pytest.raises(ValueError, match="either the dense transformer or its recorded"):
        AttentionProbe(_Transformer(1), sparse, None, recorded=[])
    with pytest.raises(ValueError, match="either the dense transformer or its recorded"):
        AttentionProbe(None, sparse, None)


@pytest.mark.parametrize("rows", [0, -3, 2.5, True])
def test_bad_rows_are_named(rows):
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        AttentionProbe(_Transformer(1), _Transformer(1), handle=None, rows=rows)

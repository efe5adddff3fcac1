"""Synthetic video-DiT attention: determinism, shapes, and the paper's anatomy (Sec. 3.4.1)."""

import pytest
import torch

from tailattn.data.synthetic import ARCHETYPES, PRESETS, SyntheticSource, apply_rope, rope_angles
from tailattn.study.anatomy import row_stats
from tailattn.study.chunk import Chunk


def head_chunk(source, head, rows=192):
    q, k, v = (x.double()[0, 0] for x in source.head(head))
    idx = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(1))[:rows]
    return Chunk(idx, q[idx] @ k.T / q.shape[-1] ** 0.5, v)


@pytest.fixture(scope="module")
def stats():
    source = SyntheticSource("small")
    return {
        h: {k: float(v.mean()) for k, v in row_stats(head_chunk(source, h)).items()}
        for h in range(source.heads)
    }


def test_presets_have_the_documented_shapes():
    assert PRESETS["wan-1.3b-480p"].grid == (21, 30, 52)
    assert (PRESETS["wan-1.3b-480p"].heads, PRESETS["wan-1.3b-480p"].head_dim) == (12, 128)
    assert PRESETS["wan-14b-720p"].grid == (21, 45, 80)
    assert (PRESETS["wan-14b-720p"].heads, PRESETS["wan-14b-720p"].tokens) == (40, 75_600)
    q, k, v = SyntheticSource("wan-1.3b-480p").head(11)
    assert q.shape == k.shape == v.shape == (1, 1, 32_760, 128)


def test_generation_is_deterministic_per_seed_and_head():
    a, b = SyntheticSource("small", seed=3), SyntheticSource("small", seed=3)
    first = a.head(2)
    for x, y in zip(first, b.head(2), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], SyntheticSource("small", seed=4).head(2)[0])
    assert not torch.equal(first[0], a.head(3)[0])


def test_values_are_standardized_and_finite():
    q, k, v = SyntheticSource("small").head(0)
    assert all(torch.isfinite(x).all() for x in (q, k, v))
    assert torch.allclose(v[0, 0].std(0), torch.ones(64), atol=1e-3)


def test_rope_is_a_rotation_that_depends_on_relative_position():
    angles, _ = rope_angles((2, 3, 4), 24)
    x = torch.randn(24, 24, dtype=torch.float64)
    rotated = apply_rope(x, angles)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1))
    # same vector at every position: dot products depend on the offset only
    u = torch.randn(1, 24, dtype=torch.float64).expand(24, 24)
    r = apply_rope(u.clone(), angles)
    dots = r @ r.T
    assert torch.allclose(dots.diagonal(), dots.diagonal()[:1].expand(24))


def test_softmax_is_skewed(stats):
    """A small fraction of keys holds most of the mass (Fig. 3a): the top 10 % of keys hold
    well over 10 % of the mass in every head, and most of it in most heads."""
    top10 = [s["top10_mass"] for s in stats.values()]
    assert min(top10) > 0.3
    assert sorted(top10)[len(top10) // 2] > 0.7
    assert all(s["top1_mass"] > 0.05 for s in stats.values())


def test_lower_90_percent_sits_in_a_narrow_band_near_zero(stats):
    """Every probability of the lower 90 % is at most a few times uniform (1/N), far below the
    row maximum (Fig. 3b, c)."""
    for s in stats.values():
        assert s["lower90_peak"] < 5.0
        assert s["lower90_logit_std"] < 2.0


def test_adjacent_sorted_differences_peak_at_zero(stats):
    for s in stats.values():
        assert s["delta_zero_share"] > 0.9


def test_heads_differ_in_recall(stats):
    top10 = [s["top10_mass"] for s in stats.values()]
    assert max(top10) - min(top10) > 0.2
    assert len(ARCHETYPES) == SyntheticSource("small").heads


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        SyntheticSource("huge")
    with pytest.raises(ValueError, match="head must be"):
        SyntheticSource("small").head(6)
    with pytest.raises(TypeError, match="seed"):
        SyntheticSource("small", seed=1.5)

"""The study's one-pass evaluation equals tailattn.attention for every kind of method."""

import pytest
import torch

import tailattn
from study_check import study_and_library
from tailattn.study.chunk import Chunk, sort_descending
from tailattn.study.engine import evaluate_unit, sample_rows
from tailattn.study.plan import pairs_for, parse_methods

GRID = (4, 8, 8)
B32 = "block_q=32, block_k=32"
SPECS = [
    "topk",
    "topk+uta",
    "topk+uta-norm",
    "topk+bins4",
    "topk+bins(n=3, mode=width)",
    "topk+moment",
    "topk+lowdelta(delta=0.5)",
    "topp(p=0.8)+uta",
    "threshold(lam=0.01)+bins2",
    f"svg2({B32})",
    f"svg2({B32})+uta",
    f"svg2({B32})+blocks",
    f"svg2({B32})+moment",
    f"radial({B32})+uta",
    f"window({B32})+blocks",
    f"block-topk({B32})+drop",
]


@pytest.fixture(scope="module")
def qkv():
    gen = torch.Generator().manual_seed(0)
    n, d = 256, 32
    centers = torch.randn(6, d, generator=gen, dtype=torch.float64)
    assign = torch.randint(0, 6, (n,), generator=gen)
    k = centers[assign] + 0.6 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    q = 2.5 * centers[assign.roll(7)] + 0.4 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return tuple(x.view(1, 1, n, d) for x in (q, k, v))


@pytest.mark.parametrize("queries", [None, 37])
def test_every_pair_matches_the_library(qkv, queries):
    checks = study_and_library(qkv, SPECS, queries, GRID, backend="reference")
    for pair, got, info, sub, ref in checks:
        assert got["mse"] == pytest.approx(tailattn.metrics.mse(sub, ref), rel=1e-9), pair
        assert got["rel_l2"] == pytest.approx(tailattn.metrics.rel_l2(sub, ref), rel=1e-9)
        if queries is None:
            assert got["recall"] == pytest.approx(info["recall"], rel=1e-9), pair
            assert 1 - got["recall_implied"] == pytest.approx(info["implied_tv"], abs=1e-9)
            assert got["density"] == pytest.approx(info["density"], rel=1e-9)
            assert got["budget"] == pytest.approx(info["budget"], rel=1e-9), pair


def test_sampled_rows_are_unique_sorted_and_seeded():
    a, b = sample_rows(1000, 100, seed=1), sample_rows(1000, 100, seed=1)
    assert torch.equal(a, b) and a.unique().numel() == 100
    assert torch.equal(a, a.sort().values)
    assert not torch.equal(a, sample_rows(1000, 100, seed=2))
    assert torch.equal(sample_rows(50, 100, seed=1), torch.arange(50))


def test_chunk_prefix_sums_and_sort():
    z = torch.randn(5, 40, dtype=torch.float64)
    chunk = Chunk(torch.arange(5), z, torch.randn(40, 3, dtype=torch.float64))
    assert torch.equal(sort_descending(z), z.sort(dim=-1, descending=True).values)
    assert torch.allclose(chunk.p_prefix[:, -1], torch.ones(5, dtype=torch.float64))
    assert torch.allclose(chunk.reference[0], torch.softmax(z, -1) @ chunk.v)


def test_block_selection_that_cannot_run_is_skipped_with_its_reason(qkv):
    methods = {m.spec: m for m in parse_methods(["topk", f"radial({B32})"])}
    pairs = pairs_for(methods.values(), [0.5])
    stats, *_, skipped = evaluate_unit(qkv, pairs, methods, rows=torch.arange(8), grid=(4, 8, 9))
    assert [p.spec for p in stats] == ["topk"]
    [(pair, why)] = skipped.items()
    assert pair.spec.startswith("radial") and "grid" in why

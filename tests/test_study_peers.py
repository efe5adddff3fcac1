"""The seed methods in the study: one-pass evaluation equals tailattn.attention."""

import pytest
import torch

import tailattn
from study_check import study_and_library
from tailattn.study import METHOD_SETS, PEER_METHODS, expand_methods
from tailattn.study.engine import evaluate_unit
from tailattn.study.plan import pairs_for, parse_methods
from video_like import grid_qkv

GRID = (4, 8, 8)
B32 = "block_q=32, block_k=32"
SPECS = [
    f"dfs({B32}, tile=8)",
    f"dfs({B32}, tile=8)+uta",
    f"rectified({B32})",
    f"rectified({B32}, drop_rate=0.9, curve=gilbert)",
    f"blasst({B32}, lam=0.3)",
    f"blasst({B32}, lam=0.3)+uta",
    f"recall({B32}, recall=0.9)+blocks",
    f"recall({B32}, recall=0.8)",
]


@pytest.fixture(scope="module")
def qkv():
    q, k, v = grid_qkv(GRID, heads=1, seed=3)
    return q, k, v


@pytest.mark.parametrize("queries", [None, 41])
def test_seed_methods_match_the_library(qkv, queries):
    for pair, got, info, sub, ref in study_and_library(qkv, SPECS, queries, GRID):
        assert got["mse"] == pytest.approx(tailattn.metrics.mse(sub, ref), rel=1e-9), pair
        assert got["rel_l2"] == pytest.approx(tailattn.metrics.rel_l2(sub, ref), rel=1e-9)
        if queries is None:
            assert got["recall"] == pytest.approx(info["recall"], rel=1e-9), pair
            assert got["density"] == pytest.approx(info["density"], rel=1e-9), pair
            if pair.spec.startswith("dfs"):
                assert got["density"] < 1.0  # dfs runs sparse: no warmup in the study
        if pair.spec.startswith("rectified"):
            assert 0.0 <= 1 - got["recall_implied"] < 1.0


def test_rectified_at_drop_rate_zero_implies_the_exact_distribution(qkv):
    methods = {m.spec: m for m in parse_methods([f"rectified({B32}, drop_rate=0)"])}
    pairs = pairs_for(methods.values(), [0.5])
    stats, *_ = evaluate_unit(
        qkv, pairs, methods, rows=torch.arange(64), grid=GRID, dtype=torch.float64
    )
    (s,) = stats.values()
    assert s.means()["mse"] < 1e-20 and s.means()["recall_implied"] == pytest.approx(1.0)


def test_seed_method_list_expands_and_parses():
    assert expand_methods(("topk", "peers")) == ("topk", *PEER_METHODS)
    assert expand_methods(("paper",)) == METHOD_SETS["paper"]
    infos = parse_methods(PEER_METHODS)
    assert {i.granularity for i in infos} == {"block", "fused"}
    assert [i.budgeted for i in infos if i.spec.startswith("dfs")] == [True, True]


def test_rectified_without_grid_is_skipped_with_its_reason(qkv):
    methods = {m.spec: m for m in parse_methods(["topk", "rectified"])}
    pairs = pairs_for(methods.values(), [0.5])
    stats, *_, skipped = evaluate_unit(qkv, pairs, methods, rows=torch.arange(8), grid=None)
    assert [p.spec for p in stats] == ["topk"]
    [(pair, why)] = skipped.items()
    assert pair.spec == "rectified" and "needs grid" in why

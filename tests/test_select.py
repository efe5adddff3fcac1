"""Oracle selections: exact budgets, no duplicates, extremes of keep."""

import math

import pytest
import torch

import tailattn
from tailattn.reference import iter_logits
from tailattn.select import Threshold, TopK, TopP


def logits(skewed, n=200, seed=0):
    q, k, _ = skewed(seed=seed, n=n)
    return next(iter_logits(q, k, 1 / math.sqrt(q.shape[-1]), torch.float64))[1]


@pytest.mark.parametrize("keep", [1e-6, 0.013, 0.1, 0.25, 0.5, 0.999, 1.0])
def test_topk_budget_and_order(skewed, keep):
    z = logits(skewed)
    kept = TopK(keep)(z)
    budget = min(200, max(1, math.ceil(keep * 200 - 1e-9)))
    assert bool((kept.sum(-1) == budget).all())
    # every kept logit is at least every dropped one
    lo = z.masked_fill(~kept, math.inf).amin(-1)
    hi = z.masked_fill(kept, -math.inf).amax(-1)
    assert bool((lo >= hi).all())


def test_topk_integral_budget_not_rounded_up():
    assert TopK(0.1).budget(4096) == 410
    assert TopK(0.3).budget(10) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_topp_is_minimal_set_reaching_p(skewed, p):
    z = logits(skewed, seed=1)
    kept = TopP(p)(z)
    probs = torch.softmax(z, -1)
    mass = (probs * kept).sum(-1)
    assert bool((mass >= p - 1e-12).all())
    smallest_kept = probs.masked_fill(~kept, math.inf).amin(-1)
    assert bool((mass - smallest_kept < p).all())  # removing any kept key falls below p


def test_threshold_keeps_max_and_respects_lam(skewed):
    z = logits(skewed, seed=2)
    kept = Threshold(0.05)(z)
    ratio = torch.exp(z - z.amax(-1, keepdim=True))
    assert bool((kept == (ratio >= 0.05 - 1e-12)).all())
    assert bool(kept.any(-1).all())


def test_smallest_keep_is_one_key(skewed):
    q, k, v = skewed(seed=3, n=128)
    out, info = tailattn.attention(q, k, v, "topk+uta", keep=1e-9, return_info=True)
    assert info["density"] == pytest.approx(1 / 128)
    assert torch.isfinite(out).all()


def test_density_of_topp_and_threshold_reported(skewed):
    q, k, v = skewed(seed=4, n=128)
    _, a = tailattn.attention(q, k, v, "topp(p=0.5)", return_info=True)
    _, b = tailattn.attention(q, k, v, "topp", p=0.95, return_info=True)
    assert 0 < a["density"] < b["density"] <= 1
    assert b["recall"] >= 0.95 - 1e-12

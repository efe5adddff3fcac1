"""Theorem 3.1 and brute-force definitions of every tail estimator, in float64."""

import itertools
import math

import pytest
import torch

import tailattn
from tailattn.metrics import mse


def equal_tail_qkv(n: int, n_top: int, d: int = 8, seed: int = 0):
    """Queries along e1; n_top keys with a large e1 component, the rest with one equal smaller
    component: every query's dropped logits are identical once the top keys are kept."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.zeros(1, 1, 16, d, dtype=torch.float64)
    q[..., 0] = 0.5 + torch.rand(16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)
    k[..., 0] = -1.0
    k[..., :n_top, 0] = 2.0 + torch.rand(n_top, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("n_top", [1, 7, 32, 63])
def test_theorem_3_1_uta_exact_for_equal_tail_logits(n_top):
    n = 64 * 3
    q, k, v = equal_tail_qkv(n, n_top)
    ref = tailattn.full_attention(q, k, v)
    keep = n_top / n
    out_uta = tailattn.attention(q, k, v, "topk+uta", keep=keep)
    out_drop = tailattn.attention(q, k, v, "topk", keep=keep)
    assert (out_uta - ref).abs().max() < 1e-12
    assert (out_drop - ref).abs().max() > 1e-6  # dropping is not exact on the same input
    out_moment = tailattn.attention(q, k, v, "topk+moment", keep=keep)
    assert (out_moment - out_uta).abs().max() < 1e-13


def brute_force(q, k, v, kept_sets, tail_fn):
    """Per query: exact sums over T plus whatever tokens tail_fn(z_D, v_D) returns."""
    s = 1 / math.sqrt(q.shape[-1])
    out = torch.zeros(q.shape[2], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[2]):
        z = (k[0, 0] @ q[0, 0, i]) * s
        kept = kept_sets[i]
        dropped = [j for j in range(z.shape[0]) if j not in kept]
        logits = [z[j] for j in kept]
        values = [v[0, 0, j] for j in kept]
        for zt, vt in tail_fn(z[dropped], v[0, 0, dropped]):
            logits.append(zt)
            values.append(vt)
        logits = torch.stack(logits)
        w = torch.exp(logits - logits.max())
        out[i] = (w[:, None] * torch.stack(values)).sum(0) / w[: len(kept)].sum().add(
            w[len(kept) :].sum()
        )
    return out


def topk_sets(q, k, budget):
    z = q[0, 0] @ k[0, 0].T
    return [set(row.topk(budget).indices.tolist()) for row in z]


def uta_token(zd, vd):
    return [(zd.mean() + math.log(len(zd)), vd.mean(0))]


def uta_norm_token(zd, vd):
    return [(zd.mean() + math.log(len(zd)), torch.zeros_like(vd[0]))]


def moment_token(zd, vd):
    dev = zd - zd.mean()
    sigma2 = (dev**2).mean()
    cov = (dev[:, None] * vd).mean(0)
    gain = 1 + sigma2 / 2
    return [(zd.mean() + math.log(len(zd)) + math.log(gain), vd.mean(0) + cov / gain)]


@pytest.mark.parametrize(
    ("tail", "tokens"), [("uta", uta_token), ("uta-norm", uta_norm_token), ("moment", moment_token)]
)
def test_tails_match_brute_force(skewed, tail, tokens):
    q, k, v = skewed(seed=3, h=1, n=96, d=16)
    q = q[:, :, :24]
    budget = 20
    out = tailattn.attention(q, k, v, f"topk+{tail}", keep=budget / 96)
    expected = brute_force(q, k, v, topk_sets(q, k, budget), tokens)
    assert (out[0, 0] - expected).abs().max() < 1e-12


def test_bins_count_match_brute_force(skewed):
    q, k, v = skewed(seed=4, h=1, n=96, d=16)
    q = q[:, :, :24]
    budget, n_bins = 30, 4

    def bins(zd, vd):
        order = zd.argsort(descending=True, stable=True)
        groups = [[] for _ in range(n_bins)]
        for rank, j in enumerate(order.tolist()):
            groups[rank * n_bins // len(zd)].append(j)
        return [(zd[g].mean() + math.log(len(g)), vd[g].mean(0)) for g in groups if g]

    out = tailattn.attention(q, k, v, f"topk+bins{n_bins}", keep=budget / 96)
    expected = brute_force(q, k, v, topk_sets(q, k, budget), bins)
    assert (out[0, 0] - expected).abs().max() < 1e-12


def test_one_bin_equals_uta(skewed):
    q, k, v = skewed(seed=5)
    for mode in ("count", "width"):
        a = tailattn.attention(q, k, v, f"topk+bins(n=1, mode={mode})", keep=0.2)
        b = tailattn.attention(q, k, v, "topk+uta", keep=0.2)
        assert (a - b).abs().max() < 1e-12


def test_one_bin_per_dropped_key_is_exact(skewed):
    q, k, v = skewed(seed=6, n=80)
    keep = 20 / 80  # 60 dropped keys, 60 bins
    ref = tailattn.full_attention(q, k, v)
    out, info = tailattn.attention(q, k, v, "topk+bins60", keep=keep, return_info=True)
    assert (out - ref).abs().max() < 1e-12
    assert info["implied_tv"] < 1e-12
    assert abs(info["tail_mass_error"]) < 1e-12


def test_lowdelta_zero_delta_is_exact_and_groups_bounded(skewed):
    q, k, v = skewed(seed=7, n=64)
    ref = tailattn.full_attention(q, k, v)
    out = tailattn.attention(q, k, v, "topk+lowdelta(delta=0)", keep=0.25)
    assert (out - ref).abs().max() < 1e-12
    # a wider delta uses fewer groups (smaller budget) and is less exact
    _, tight = tailattn.attention(q, k, v, "topk+lowdelta(delta=0.1)", keep=0.25, return_info=True)
    _, loose = tailattn.attention(q, k, v, "topk+lowdelta(delta=2)", keep=0.25, return_info=True)
    assert loose["budget"] < tight["budget"] < 1.0
    assert tight["budget"] > 0.25


def test_lowdelta_groups_respect_delta(skewed):
    from tailattn.reference import iter_logits
    from tailattn.tails import LowDelta

    q, k, _v = skewed(seed=8, n=128)
    _, z = next(iter_logits(q, k, 1 / math.sqrt(q.shape[-1]), torch.float64))
    kept = torch.zeros_like(z, dtype=torch.bool)
    kept[..., :10] = True
    groups = list(LowDelta(delta=0.3)._groups(z, ~kept))
    covered = torch.zeros_like(kept)
    for members in groups:
        spread = z.masked_fill(~members, -math.inf).amax(-1) - z.masked_fill(
            ~members, math.inf
        ).amin(-1)
        assert bool((spread[members.any(-1)] <= 0.3 + 1e-12).all())
        assert not bool((covered & members).any())  # no key in two groups
        covered |= members
    assert bool((covered == ~kept).all())


def test_moment_reduces_to_uta_when_values_and_logits_flat():
    q, k, v = equal_tail_qkv(128, 10, seed=2)
    a = tailattn.attention(q, k, v, "topk+moment", keep=10 / 128)
    b = tailattn.attention(q, k, v, "topk+uta", keep=10 / 128)
    assert (a - b).abs().max() < 1e-13


def test_uta_tail_mass_is_a_jensen_underestimate(skewed):
    q, k, v = skewed(seed=9)
    _, info = tailattn.attention(q, k, v, "topk+uta", keep=0.1, return_info=True)
    assert info["tail_mass_error"] < 0
    _, drop = tailattn.attention(q, k, v, "topk", keep=0.1, return_info=True)
    assert drop["tail_mass_error"] == pytest.approx(-1.0)


def test_keep_one_is_exact_with_empty_tail(skewed):
    q, k, v = skewed(seed=10)
    ref = tailattn.full_attention(q, k, v)
    for tail in ("drop", "uta", "uta-norm", "bins8", "lowdelta", "moment"):
        out, info = tailattn.attention(q, k, v, f"topk+{tail}", keep=1.0, return_info=True)
        assert (out - ref).abs().max() < 1e-12, tail
        assert info["budget"] == 1.0


def test_uta_beats_topk_on_skewed_input(skewed):
    q, k, v = skewed(seed=11, h=4, n=512)
    ref = tailattn.full_attention(q, k, v)
    for keep in (0.1, 0.2, 0.3, 0.4, 0.5):
        e_drop = mse(tailattn.attention(q, k, v, "topk", keep=keep), ref)
        e_uta = mse(tailattn.attention(q, k, v, "topk+uta", keep=keep), ref)
        assert e_uta < e_drop, keep


def test_bins_error_falls_with_more_bins(skewed):
    q, k, v = skewed(seed=12, h=4, n=512)
    ref = tailattn.full_attention(q, k, v)
    errors = [
        mse(tailattn.attention(q, k, v, f"topk+bins{n}", keep=0.1), ref)
        for n in (1, 2, 4, 8, 16, 32)
    ]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors

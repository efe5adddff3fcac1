"""block-err: the error model against exact errors (float64), valid layouts and budgets, every
block tail through attention() against a token-level brute force, the Triton scoring kernels
and the kernel path in the interpreter, bad parameters."""

import math
import os

import pytest
import torch

import tailattn
from study_check import study_and_library
from tailattn.layout import BlockLayout, block_sizes
from tailattn.permute import permute_tokens, unpermute_tokens
from tailattn.select import BlockErr, SVG2State
from tailattn.select.blocks import block_budget, pool_blocks
from tailattn.select.error_aware import (
    Probe,
    ProbeMerge,
    adaptive_counts,
    block_scores,
    greedy_candidates,
    greedy_drop_torch,
    key_imbalance,
    non_increasing,
    probe_stats_torch,
    sketch_matrix,
    tail_log_mass,
)
from tailattn.study.config import ERROR_AWARE_METHODS

GRID = (2, 8, 16)
N = 256
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def qkv(seed: int, n: int = N, d: int = 32, b: int = 1, h: int = 2, dtype=torch.float64):
    """Clustered keys, queries drawn towards the clusters, smooth values: a skewed softmax."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, 6, d, generator=gen, dtype=dtype)
    label = torch.randint(0, 6, (b, h, n, 1), generator=gen).expand(b, h, n, d)
    k = centers.gather(2, label) + 0.6 * torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    q = 1.5 * centers.gather(2, label.roll(3, 2)) + 0.5 * torch.randn(
        b, h, n, d, generator=gen, dtype=dtype
    )
    v = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    return q, k, v


def brute_force(q, k, v, layout, tail, scale):
    """Token-level float64: exact kept blocks plus the tail's tokens, in original order."""
    qp, kp, vp = (
        permute_tokens(x.double(), p)
        for x, p in ((q, layout.q_perm), (k, layout.kv_perm), (v, layout.kv_perm))
    )
    z = scale * qp @ kp.mT
    kept = layout.token_mask()
    logits, values = [z.masked_fill(~kept, -math.inf)], [vp.unsqueeze(2).expand(*z.shape, -1)]
    dropped = (~kept).double()
    n_d = dropped.sum(-1, keepdim=True).clamp_min(1)
    zbar = (z * dropped).sum(-1, keepdim=True) / n_d
    vbar = dropped @ vp / n_d
    if tail in ("uta", "moment"):
        gain = torch.ones_like(zbar)
        value = vbar
        if tail == "moment":
            gain = 1 + 0.5 * (((z - zbar) ** 2 * dropped).sum(-1, keepdim=True) / n_d)
            value = vbar + ((z - zbar) * dropped) @ vp / n_d / gain
        logits.append(torch.where(n_d > 0, zbar + torch.log(n_d) + torch.log(gain), -math.inf))
        values.append(value.unsqueeze(-2))
    if tail == "blocks":
        sizes = block_sizes(layout.n_k, layout.block_k).double()
        onehot = torch.nn.functional.one_hot(torch.arange(layout.n_k) // layout.block_k).double()
        kbar, vbar_j = (onehot.T @ kp) / sizes[:, None], (onehot.T @ vp) / sizes[:, None]
        block_kept = layout.to_dense()[:, :, torch.arange(layout.n_q) // layout.block_q]
        token = scale * qp @ kbar.mT + torch.log(sizes)
        logits.append(token.masked_fill(block_kept, -math.inf))
        values.append(vbar_j.unsqueeze(2).expand(*token.shape, -1))
    logits = torch.cat(logits, -1)
    weights = torch.softmax(logits, -1)
    out = (weights.unsqueeze(-1) * torch.cat(values, -2)).sum(-2)
    return unpermute_tokens(out, layout.q_perm)


def valid(layout: BlockLayout) -> BlockLayout:
    """The same layout, validated (every check of BlockLayout runs)."""
    fields = (layout.kv_indices, layout.kv_counts, layout.n_q, layout.n_k)
    sizes = (layout.block_q, layout.block_k, layout.q_perm, layout.kv_perm)
    return BlockLayout(*fields, *sizes, check=True)


# ------------------------------------------------------------------ the error model, float64


@pytest.mark.parametrize("tail", ["drop", "uta", "blocks"])
def test_tail_error_is_the_sum_of_the_dropped_blocks_errors(tail):
    """O_tail - O = sum_D e_j / (sum_T p_j + sum_D a_j), e_j = (a_j - p_j)(vbar_j - O)
    - p_j (mu_j - vbar_j): exact for one query (block_q = 1, the probe is the query)."""
    q, k, v = qkv(1, n=120, d=16, h=1)
    s, bk = 0.4, 16
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(1, 1, 120, 8, generator=gen) < 0.3
    mask[..., 0] = True
    layout = BlockLayout.from_dense(mask, 120, 120, 1, bk)
    exact = brute_force(q, k, v, layout, tail, s) - tailattn.full_attention(q, k, v, scale=s)
    z = s * q[0, 0] @ k[0, 0].T  # (Nq, Nk)
    p_tok = torch.softmax(z, -1)
    block = torch.arange(120) // bk
    onehot = torch.nn.functional.one_hot(block).double()  # (Nk, Mk)
    sizes = onehot.sum(0)
    p = p_tok @ onehot
    mu = torch.einsum("qt,tj,td->qjd", p_tok, onehot, v[0, 0]) / p.unsqueeze(-1)
    vbar = (onehot.T @ v[0, 0]) / sizes[:, None]
    out = p_tok @ v[0, 0]
    lse = torch.logsumexp(z, -1, keepdim=True)
    kept = mask[0, 0].double()
    if tail == "drop":
        a = torch.zeros_like(p)
    elif tail == "blocks":
        a = torch.exp(s * q[0, 0] @ ((onehot.T @ k[0, 0]) / sizes[:, None]).T + sizes.log() - lse)
    else:  # every dropped key gets the mean dropped logit
        dropped_tok = (1 - kept) @ onehot.T
        zhat = (z * dropped_tok).sum(-1, keepdim=True) / dropped_tok.sum(-1, keepdim=True)
        a = torch.exp(zhat + sizes.log() - lse)
    e = (a - p).unsqueeze(-1) * (vbar - out.unsqueeze(1)) - p.unsqueeze(-1) * (mu - vbar)
    den = (kept * p).sum(-1) + ((1 - kept) * a).sum(-1)
    model = ((1 - kept).unsqueeze(-1) * e).sum(1) / den.unsqueeze(-1)
    assert float((model - exact[0, 0]).abs().max()) < 1e-12


def test_probe_statistics_match_brute_force():
    q, k, _ = qkv(3, n=200, d=16, h=2)
    s, bq, bk, r = 0.3, 32, 64, 8
    qhat = pool_blocks(q, bq)
    sketch = sketch_matrix(16, r, torch.float64, torch.device("cpu"))
    probe = probe_stats_torch(qhat, k, s, bk, sketch, chunk_bytes=4096)  # several chunks
    sizes = block_sizes(200, bk)
    for j, start in enumerate(range(0, 200, bk)):
        keys = k[:, :, start : start + bk]
        z = s * qhat @ keys.mT
        w = torch.softmax(z, -1)
        assert torch.allclose(probe.log_mass[..., j], torch.logsumexp(z, -1), atol=1e-12)
        centered = (keys - k.mean(2, keepdim=True)) @ sketch
        assert torch.allclose(probe.key_sketch[..., j, :], w @ centered, atol=1e-12)
    assert probe.log_mass.shape == (1, 2, 7, int(sizes.numel()))


def test_a_block_of_equal_keys_has_no_mass_error_under_blocks():
    """Theorem 3.1 per block: equal logits in a block make its ``blocks`` token carry the
    block's exact mass (a = p), so its score is the value term p^2 alone; ``drop`` and ``uta``
    also pay for the mass."""
    q, k, _ = qkv(4, n=128, d=16, h=1)
    k[:, :, 32:64] = k[:, :, 32:33]  # key block 1 holds one key 32 times
    s, bk = 0.5, 32
    qhat = pool_blocks(q, 64)
    probe = probe_stats_torch(qhat, k, s, bk, None)
    p = probe.mass()[..., 1]
    scores = {t: block_scores(probe, tail_log_mass(qhat, k, s, bk, t))[..., 1] for t in FOR}
    assert torch.allclose(scores["blocks"], p**2, rtol=1e-12)
    assert torch.allclose(scores["drop"], 2 * p**2, rtol=1e-12)
    assert bool((scores["uta"] > p**2 * (1 + 1e-6)).all())


FOR = ("drop", "uta", "blocks")


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last dimension."""
    rx, ry = (t.argsort(-1).argsort(-1).double() for t in (x, y))
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.norm(dim=-1) * ry.norm(dim=-1))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tail", ["uta", "blocks"])
def test_tail_score_ranks_blocks_like_their_exact_expected_error(seed, tail):
    """Where the estimator's assumptions hold (one query per block, so the probe is the query;
    values i.i.d. with covariance sigma^2 I), e_j is linear in the values, e_j = sum_t c_jt v_t,
    and E|e_j|^2 = sigma^2 D |c_j|^2 exactly (float64). The score (p - a)^2 + p^2 ranks the
    blocks as that exact expectation does."""
    q, k, v = qkv(seed, n=256, d=16, h=1)
    s, bk = 0.5, 16
    probes = q[:, :, :8]  # eight queries, each its own block
    probe = probe_stats_torch(probes, k, s, bk, None)
    score = block_scores(probe, tail_log_mass(probes, k, s, bk, tail))[0, 0]
    z = s * probes[0, 0] @ k[0, 0].T
    weights = torch.softmax(z, -1)  # (8, N)
    onehot = torch.nn.functional.one_hot(torch.arange(256) // bk).double()  # (N, Mk)
    sizes = onehot.sum(0)
    p = weights @ onehot
    lse = torch.logsumexp(z, -1, keepdim=True)
    if tail == "blocks":
        zhat = s * probes[0, 0] @ (onehot.T @ k[0, 0] / sizes[:, None]).T
    else:  # the model's uta logit: the mean logit over all keys
        zhat = z.mean(-1, keepdim=True)
    a = torch.exp(zhat + sizes.log() - lse)
    uniform = (onehot.T / sizes[:, None]).unsqueeze(0)  # vbar_j = uniform_j . v
    within = weights.unsqueeze(1) * onehot.T.unsqueeze(0) / p.unsqueeze(-1)  # mu_j = within_j . v
    coeff = (a - p).unsqueeze(-1) * (uniform - weights.unsqueeze(1)) - p.unsqueeze(-1) * (
        within - uniform
    )
    mu, vbar, out = within @ v[0, 0], uniform @ v[0, 0], weights @ v[0, 0]
    e = (a - p).unsqueeze(-1) * (vbar - out.unsqueeze(1)) - p.unsqueeze(-1) * (mu - vbar)
    assert torch.allclose(coeff @ v[0, 0], e, atol=1e-12)  # e_j = c_j . v, the identity's terms
    expected = (coeff * coeff).sum(-1)  # E|e_j|^2 / (sigma^2 D)
    assert bool((rank_correlation(score, expected) > 0.95).all())


def test_greedy_objective_is_the_exact_drop_error_when_values_follow_the_keys():
    """With v = k Q (Q orthogonal), one query per block, no sketch and kappa = 0, the greedy's
    objective after each step is the exact squared drop error of the picked set."""
    q, k, _ = qkv(5, n=160, d=16, h=1)
    gen = torch.Generator().manual_seed(6)
    rot = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0]
    v = k @ rot
    s, bk = 0.4, 16
    probe = probe_stats_torch(q, k, s, bk, torch.eye(16, dtype=torch.float64))
    picks, objective = greedy_drop_torch(*key_imbalance(probe), steps=4, kappa=0.0)
    full = tailattn.full_attention(q, k, v, scale=s)
    for step in range(4):
        mask = torch.zeros(1, 1, 160, 10, dtype=torch.bool)
        mask.scatter_(-1, picks[..., : step + 1], True)
        layout = BlockLayout.from_dense(mask, 160, 160, 1, bk)
        err = brute_force(q, k, v, layout, "drop", s) - full
        assert torch.allclose(objective[..., step], (err * err).sum(-1), rtol=1e-9, atol=1e-15)
    assert bool((picks.sort(-1).values.diff(dim=-1) > 0).all())  # distinct picks


def test_greedy_kappa_counts_the_dropped_blocks():
    """J = (|sum_T d|^2 + kappa sum_D |d|^2) / (sum_T p)^2: with every block kept it is 0."""
    q, k, _ = qkv(7, n=96, d=16, h=1)
    probe = probe_stats_torch(pool_blocks(q, 32), k, 0.3, 16, torch.eye(16, dtype=torch.float64))
    p, d = key_imbalance(probe)
    picks, objective = greedy_drop_torch(p, d, steps=6, kappa=0.7)
    assert float(objective[..., -1].abs().max()) < 1e-12
    first = picks[..., 0]
    norms = (d * d).sum(-1)
    rest = norms.sum(-1) - norms.gather(-1, first[..., None]).squeeze(-1)
    expected = (norms.gather(-1, first[..., None]).squeeze(-1) + 0.7 * rest) / (
        p.gather(-1, first[..., None]).squeeze(-1) ** 2
    )
    assert torch.allclose(objective[..., 0], expected, rtol=1e-12)


def test_greedy_candidates_are_the_heaviest_blocks():
    """C = max(candidates, 4 steps) blocks of largest probe mass, ascending; None for all."""
    log_mass = torch.randn(2, 3, 4, 50, generator=torch.Generator().manual_seed(3))
    ids = greedy_candidates(log_mass, steps=5, candidates=8)
    assert ids.shape == (2, 3, 4, 20) and bool((ids.diff(dim=-1) > 0).all())
    heaviest = log_mass.topk(20, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(ids, heaviest)
    assert greedy_candidates(log_mass, steps=5, candidates=24).shape[-1] == 24
    assert greedy_candidates(log_mass, steps=5, candidates=50) is None
    assert greedy_candidates(log_mass, steps=13, candidates=8) is None  # 4 x 13 >= 50 blocks


def test_candidates_restrict_the_picks_and_leave_the_rest_in_j():
    """With fewer candidates than key blocks the drop greedy picks among the heaviest only, and
    its objective still counts the other blocks (mass and kappa term of the whole row): the
    same as the unrestricted greedy on a row whose other blocks may not be picked."""
    q, k, _ = qkv(31, n=640, d=16, h=2)
    sel = BlockErr(0.05, for_tail="drop", candidates=12, block_q=32, block_k=16)
    scale = 0.3
    probe = probe_stats_torch(pool_blocks(q, 32), k, scale, 16, sketch_matrix(16, 16,
                              torch.float64, q.device))  # fmt: skip
    ranked, _ = sel.ranking(q, k, scale, budget=2)
    ids = greedy_candidates(probe.log_mass, steps=2, candidates=12)
    assert ids.shape[-1] == 12 < 40
    assert bool((ranked.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).all())
    allowed = torch.zeros_like(probe.log_mass, dtype=torch.bool).scatter_(-1, ids, True)
    p, d = key_imbalance(probe)
    picks, objective = greedy_drop_torch(p, d, 2, 0.25, allowed)
    assert torch.equal(ranked, picks)
    norms = (d * d).sum(-1)  # step 1 by hand: the kappa term covers all 39 other blocks
    first = picks[..., :1]
    expected = (norms.gather(-1, first) + 0.25 * (norms.sum(-1, keepdim=True) -
                norms.gather(-1, first))) / p.gather(-1, first) ** 2  # fmt: skip
    assert torch.allclose(objective[..., 0], expected.squeeze(-1), rtol=1e-12)
    everything = BlockErr(0.05, for_tail="drop", candidates=40, block_q=32, block_k=16)
    unrestricted = greedy_drop_torch(p, d, 2, 0.25)[0]
    assert torch.equal(everything.ranking(q, k, scale, budget=2)[0], unrestricted)


# ------------------------------------------------------------------ layouts and budgets


@pytest.mark.parametrize("for_tail", ["drop", "uta", "blocks"])
@pytest.mark.parametrize("order", ["none", "gilbert"])
@pytest.mark.parametrize("keep", [0.05, 0.3, 1.0])
def test_fixed_budget_keeps_ceil_keep_mk_blocks(for_tail, order, keep):
    q, k, _ = qkv(8)
    sel = BlockErr(keep, for_tail=for_tail, order=order, block_q=32, block_k=32)
    layout = valid(sel(q, k, scale=0.2, grid=GRID))
    assert bool((layout.kv_counts == block_budget(keep, 8)).all())
    if order == "gilbert":
        assert layout.q_perm is not None and torch.equal(layout.q_perm, layout.kv_perm)


@pytest.mark.parametrize("for_tail", ["drop", "uta", "blocks"])
@pytest.mark.parametrize("keep", [0.2, 0.3, 0.5])
def test_adaptive_budget_spends_the_same_total(for_tail, keep):
    q, k, _ = qkv(9, n=300)
    sel = BlockErr(keep, for_tail=for_tail, budget="adaptive", block_q=32, block_k=32)
    layout = valid(sel(q, k, scale=0.2))
    mq, mk = 10, 10
    assert bool((layout.kv_counts.sum(-1) == mq * block_budget(keep, mk)).all())
    assert bool((layout.kv_counts >= 1).all())


def test_adaptive_counts_follow_the_largest_gains():
    gains = torch.tensor([[[[5.0, 4.0, 3.0, 2.0], [1.0, 0.5, 0.2, 0.1], [9.0, 0.3, 0.0, 0.0]]]])
    assert adaptive_counts(gains, 7).tolist() == [[[4, 2, 1]]]
    assert adaptive_counts(gains, 3).tolist() == [[[1, 1, 1]]]
    assert non_increasing(torch.tensor([3.0, 1.0, 2.0, 0.5])).tolist() == [3.0, 2.0, 2.0, 0.5]


def test_svg2_order_carries_its_centroids_in_the_state():
    q, k, _ = qkv(10)
    sel = BlockErr(0.25, order="svg2", block_q=32, block_k=32)
    state = sel.new_state()
    assert isinstance(state, SVG2State)
    first = valid(sel(q, k, scale=0.2, state=state))
    valid(sel(q, k, scale=0.2, state=state))
    assert state.calls == 2 and first.q_perm.shape == (1, 2, N)
    assert BlockErr(0.25).new_state() is None


@pytest.mark.parametrize("for_tail", ["drop", "uta"])
def test_probes_of_equal_queries_merge_into_one(for_tail):
    """``probe=8``: four probes per query block of 32; when the queries of each block are equal
    the probes are too, and the layout is the one of a single probe per block."""
    q, k, _ = qkv(18)
    q = q[:, :, ::32].repeat_interleave(32, dim=2)
    one = BlockErr(0.3, for_tail=for_tail, block_q=32, block_k=32)(q, k, scale=0.2)
    four = BlockErr(0.3, for_tail=for_tail, probe=8, block_q=32, block_k=32)(q, k, scale=0.2)
    assert torch.equal(one.to_dense(), four.to_dense())


def test_probe_merge_is_the_mean_over_each_blocks_probes():
    x = torch.arange(2 * 7, dtype=torch.float64).view(1, 2, 7)  # 7 probes of 8 queries: N <= 56
    merged = ProbeMerge(8, 32).mean(x)
    assert merged.tolist() == [[[1.5, 5.0], [8.5, 12.0]]]


def test_rank_mode_keeps_the_largest_scores():
    q, k, _ = qkv(11)
    layout = BlockErr(0.25, for_tail="blocks", block_q=32, block_k=32)(q, k, scale=0.2)
    qhat = pool_blocks(q, 32)
    probe = probe_stats_torch(qhat, k, 0.2, 32, None)
    scores = block_scores(probe, tail_log_mass(qhat, k, 0.2, 32, "blocks"))
    kept = layout.to_dense()
    low = scores.masked_fill(~kept, math.inf).amin(-1)
    high = scores.masked_fill(kept, -math.inf).amax(-1)
    assert bool((low >= high).all())


# ------------------------------------------------------------------ through attention()


@pytest.mark.parametrize(
    "spec",
    [
        "block-err(for_tail=drop)",
        "block-err+uta",
        "block-err(for_tail=blocks, budget=adaptive)+blocks",
        "block-err(order=gilbert)+moment",
        "block-err(for_tail=drop, order=hilbert, budget=adaptive)+uta",
        "block-err(order=svg2, for_tail=blocks)+drop",
    ],
)
def test_every_tail_through_attention_matches_brute_force(spec):
    q, k, v = qkv(12)
    out, info = tailattn.attention(
        q, k, v, spec, keep=0.3, grid=GRID, block_q=32, block_k=32, return_info=True
    )
    tail = tailattn.Method.parse(spec).tail
    ref = brute_force(q, k, v, info["layout"], tail, 1 / math.sqrt(32))
    assert float((out - ref).abs().max()) < 1e-10
    assert abs(info["density"] - 0.375) < 1e-12  # ceil(0.3 * 8) = 3 of 8 blocks


def test_bound_once_runs_many_times_and_names_its_spec():
    bound = tailattn.registry.bind("block-err(for_tail=drop, kappa=0.5)+drop", keep=0.2)
    assert bound.selection == BlockErr(0.2, for_tail="drop", kappa=0.5)
    q, k, v = qkv(13, dtype=torch.float32)
    first = tailattn.attention(q, k, v, bound)
    assert torch.equal(first, tailattn.attention(q, k, v, bound))


def blocks_of_32(spec: str) -> str:
    """The spec with block_q = block_k = 32."""
    m = tailattn.Method.parse(spec)
    params = {**dict(m.selection_params), "block_q": 32, "block_k": 32}
    return tailattn.Method(m.selection, m.tail, tuple(sorted(params.items())), m.tail_params).spec


@pytest.mark.parametrize("queries", [None, 37])
def test_the_study_evaluates_block_err_as_attention_does(queries):
    """The study's one-pass evaluation (``--methods errors``) equals tailattn.attention."""
    q, k, v = qkv(17, h=1)
    specs = [blocks_of_32(s) for s in (*ERROR_AWARE_METHODS, "block-err(order=svg2)+blocks")]
    checks = study_and_library((q, k, v), specs, queries, GRID, backend="reference")
    for pair, got, _, sub, ref in checks:
        assert got["mse"] == pytest.approx(tailattn.metrics.mse(sub, ref), rel=1e-9), pair


@pytest.mark.parametrize(
    "spec",
    [
        "block-err(for_tail=drop, block_q=32, block_k=32)",
        "block-err(order=svg2, budget=adaptive, block_q=32, block_k=32)+uta",
    ],
)
def test_through_apply_on_a_tiny_wan(spec):
    """apply(): keep 1 is the stock model; keep 0.25 runs sparse in every layer (SVG2's order
    with its per-layer state) and changes the output a bounded amount."""
    pytest.importorskip("diffusers")
    from diffusers_tiny import run, wan, wan_inputs
    from tailattn.integrations.diffusers import apply

    model, inputs = wan(), wan_inputs(700.0, frames=4, height=16, width=16)  # 256 tokens
    stock = run(model, inputs)
    with apply(model, spec, keep=1.0):
        torch.testing.assert_close(run(model, inputs), stock, rtol=1e-5, atol=1e-5)
    with apply(model, spec, keep=0.25) as handle:
        sparse = run(model, inputs)
    assert [(c.dense, c.keep) for c in handle.calls] == [(False, 0.25)] * 2
    change = float((sparse - stock).norm() / stock.norm())
    assert bool(torch.isfinite(sparse).all()) and 1e-4 < change < 0.5


# ------------------------------------------------------------------ Triton (interpreter or GPU)

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("block_p", [None, 16, 32])
def test_scoring_kernels_match_pytorch(block_p):
    pytest.importorskip("triton")
    from tailattn.kernels.error_scoring import greedy_drop, probe_stats

    q, k, _ = qkv(14, n=300, d=32, b=2, dtype=torch.float32)
    # 75 probes per head: one tile of 128 by default (53 rows masked), five of 16, three of 32
    qhat = pool_blocks(q, 4).to(DEVICE)
    sketch = sketch_matrix(32, 16, torch.float32, torch.device(DEVICE))
    log_mass, key_sketch = probe_stats(qhat, k.to(DEVICE), 0.25, 64, sketch, block_p=block_p)
    ref = probe_stats_torch(qhat.double().cpu(), k.double(), 0.25, 64, sketch.double().cpu())
    # float32 dots run as tf32 on the GPU: 10-bit mantissas, so log masses of about 9 are off by
    # up to ~1e-2 (1.4e-2 measured on an H200)
    tol = 3e-2 if DEVICE == "cuda" else 1e-4
    assert float((log_mass.double().cpu() - ref.log_mass).abs().max()) < tol
    assert float((key_sketch.double().cpu() - ref.key_sketch).abs().max()) < tol
    keys = k.transpose(1, 2).contiguous().to(DEVICE, torch.bfloat16).transpose(1, 2)  # bnhd view
    low, low_sketch = probe_stats(qhat, keys, 0.25, 64, sketch, block_p=block_p)
    assert float((low.double().cpu() - ref.log_mass).abs().max()) < 0.1
    assert float((low_sketch.double().cpu() - ref.key_sketch).abs().max()) < 0.1
    picks, objective = greedy_drop(log_mass, key_sketch, 4, 0.25)
    probe = Probe(log_mass.cpu(), key_sketch.cpu())
    ref_picks, ref_objective = greedy_drop_torch(*key_imbalance(probe), 4, 0.25)
    assert torch.equal(picks.cpu(), ref_picks)
    assert torch.allclose(objective.cpu(), ref_objective, rtol=1e-4)


@needs_triton
def test_probe_kernel_refuses_bad_layouts():
    pytest.importorskip("triton")
    from tailattn.kernels.error_scoring import probe_stats

    q, k, _ = qkv(16, n=64, d=32, dtype=torch.float32)
    qhat = pool_blocks(q, 16).to(DEVICE)
    with pytest.raises(ValueError, match="block_p"):
        probe_stats(qhat, k.to(DEVICE), 0.25, 16, None, block_p=24)
    with pytest.raises(ValueError, match="unit stride"):
        probe_stats(qhat.mT.contiguous().mT, k.to(DEVICE), 0.25, 16, None)


@needs_triton
def test_greedy_kernel_matches_pytorch_over_many_steps():
    """The kernel reads the chosen block's mass and imbalance back from memory each step; picks
    and objectives must still be PyTorch's (40 key blocks, a masked tail of the row, 12 steps)."""
    pytest.importorskip("triton")
    from tailattn.kernels.error_scoring import greedy_drop

    gen = torch.Generator().manual_seed(21)
    log_mass = torch.randn(2, 3, 5, 40, generator=gen, dtype=torch.float64) * 2
    key_sketch = torch.randn(2, 3, 5, 40, 16, generator=gen, dtype=torch.float64)
    log_mass[..., [3, 17]] = log_mass.amax(-1, keepdim=True) + 3  # two equal heavy blocks:
    key_sketch[..., 17, :] = key_sketch[..., 3, :]  # a tie, which the lower id wins (checks
    # tie_break_left on the GPU; the interpreter's argmin always takes the first)
    picks, objective = greedy_drop(
        log_mass.float().to(DEVICE), key_sketch.float().to(DEVICE), 12, 0.7
    )
    ref_picks, ref_objective = greedy_drop_torch(
        *key_imbalance(Probe(log_mass, key_sketch)), 12, 0.7
    )
    assert torch.equal(picks.cpu(), ref_picks)
    assert torch.allclose(objective.double().cpu(), ref_objective, rtol=1e-4)


@needs_triton
def test_greedy_kernel_with_candidates_matches_pytorch():
    """Candidate mode: the kernel gathers the candidates' row and sums mass, mean key and the
    kappa term over the whole row in chunks (300 key blocks: four full chunks and a partial
    one); picks and objectives are PyTorch's with the other blocks not allowed."""
    pytest.importorskip("triton")
    from tailattn.kernels.error_scoring import greedy_drop

    gen = torch.Generator().manual_seed(22)
    log_mass = torch.randn(1, 2, 3, 300, generator=gen, dtype=torch.float64) * 2
    key_sketch = torch.randn(1, 2, 3, 300, 16, generator=gen, dtype=torch.float64)
    ids = greedy_candidates(log_mass, steps=9, candidates=24)  # 36 = 4 x 9 candidates
    picks, objective = greedy_drop(
        log_mass.float().to(DEVICE), key_sketch.float().to(DEVICE), 9, 0.4, ids.to(DEVICE)
    )
    allowed = torch.zeros_like(log_mass, dtype=torch.bool).scatter_(-1, ids, True)
    probe = Probe(log_mass, key_sketch)
    ref_picks, ref_objective = greedy_drop_torch(*key_imbalance(probe), 9, 0.4, allowed)
    assert torch.equal(picks.cpu(), ref_picks)
    assert torch.allclose(objective.double().cpu(), ref_objective, rtol=1e-4)
    with pytest.raises(ValueError, match="steps in"):
        greedy_drop(log_mass.float().to(DEVICE), key_sketch.float().to(DEVICE), 37, 0.4,
                    ids.to(DEVICE))  # fmt: skip


@needs_triton
@pytest.mark.parametrize("tail", ["drop", "uta", "blocks", "moment"])
def test_kernel_path_matches_the_reference(tail):
    pytest.importorskip("triton")
    q, k, v = (x.to(DEVICE) for x in qkv(15, n=200, dtype=torch.float32))
    spec = f"block-err(for_tail={'drop' if tail == 'drop' else 'uta'})+{tail}"
    kwargs = {"keep": 0.5, "block_q": 64, "block_k": 64}
    out = tailattn.attention(q, k, v, spec, backend="triton", **kwargs)
    ref = tailattn.attention(q, k, v, spec, backend="reference", **kwargs)
    assert float((out - ref).norm() / ref.norm()) < 1e-3


@needs_triton
def test_kernel_path_with_candidates_matches_the_reference():
    """16 key blocks, 2 greedy steps over 8 candidates: the Triton path (top-k, sort, gathered
    greedy) keeps the reference's blocks."""
    pytest.importorskip("triton")
    q, k, v = (x.to(DEVICE) for x in qkv(16, n=1024, dtype=torch.float32))
    spec = "block-err(for_tail=drop, candidates=1)+drop"
    kwargs = {"keep": 0.1, "block_q": 64, "block_k": 64}
    out, info = tailattn.attention(q, k, v, spec, backend="triton", return_info=True, **kwargs)
    ref, ref_info = tailattn.attention(
        q, k, v, spec, backend="reference", return_info=True, **kwargs
    )
    assert torch.equal(info["layout"].to_dense().cpu(), ref_info["layout"].to_dense().cpu())
    assert float((out - ref).norm() / ref.norm()) < 1e-3


# ------------------------------------------------------------------ bad parameters


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"for_tail": "bins"}, ValueError, "for_tail must be one of drop, uta, blocks, moment"),
        ({"order": "zigzag"}, ValueError, "order must be one of none, gilbert, hilbert, svg2"),
        ({"budget": "auto"}, ValueError, "budget must be one of fixed, adaptive"),
        ({"kappa": -1.0}, ValueError, "kappa must be a finite number >= 0"),
        ({"kappa": "big"}, TypeError, "kappa must be a number"),
        ({"sketch": 0}, ValueError, "sketch must be positive"),
        ({"candidates": 0}, ValueError, "candidates must be positive"),
        ({"candidates": 2.5}, TypeError, "candidates must be a positive integer"),
        ({"text_tokens": -2}, ValueError, "text_tokens must be an integer >= 0"),
        ({"block_q": 0}, ValueError, "block_q must be a positive integer"),
        ({"probe": 48}, ValueError, "probe must divide block_q"),
        ({"probe": 0}, ValueError, "probe must be positive"),
        ({"keep": 1.5}, ValueError, "keep must be in"),
    ],
)
def test_bad_parameters_are_named(params, error, match):
    with pytest.raises(error, match=match):
        BlockErr(**{"keep": 0.1, **params})


def test_bad_calls_are_named():
    q, k, _ = qkv(16)
    with pytest.raises(ValueError, match="order='gilbert' needs grid"):
        BlockErr(0.1, order="gilbert")(q, k, scale=0.2)
    with pytest.raises(ValueError, match="grid"):
        BlockErr(0.1, order="gilbert")(q, k, scale=0.2, grid=(2, 8, 8))
    with pytest.raises(ValueError, match="reorders a self-attention"):
        BlockErr(0.1, order="svg2")(q, k[:, :, :128], scale=0.2)
    with pytest.raises(TypeError, match="state must be an SVG2State"):
        BlockErr(0.1)(q, k, scale=0.2, state=object())
    with pytest.raises(ValueError, match="takes no parameter 'p'"):
        tailattn.registry.bind("block-err+uta", keep=0.1, p=0.9)

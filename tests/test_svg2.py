"""SVG2: clusters, permutation, cluster-pair selection mapped onto blocks, warm start."""

import importlib.util
import math
import os

import pytest
import torch

import tailattn
from tailattn.select import SVG2, SVG2State
from tailattn.select.kmeans import kmeans
from tailattn.select.svg2 import cluster_pair_mass, default_clusters


def test_default_cluster_counts_scale_with_n():
    assert default_clusters(75_600, 300) == 300 and default_clusters(75_600, 1000) == 1000
    assert default_clusters(32_760, 300) == 130 and default_clusters(32_760, 1000) == 434
    assert default_clusters(1000, 300) == 8 and default_clusters(5, 1000) == 5
    assert SVG2(q_clusters=50).clusters(20, 4000) == (20, 53)


def test_permutation_makes_clusters_contiguous(skewed):
    q, k, _ = skewed(seed=1, n=200)
    sel = SVG2(keep=0.3, q_clusters=6, k_clusters=10, iterations=5, block_q=32, block_k=32)
    layout = sel(q, k, scale=0.2)
    q_km, k_km = sel.cluster(q, k)
    for perm, km in ((layout.q_perm, q_km), (layout.kv_perm, k_km)):
        ordered = km.labels.gather(-1, perm)
        assert bool((ordered[..., 1:] >= ordered[..., :-1]).all())
        assert torch.equal(perm.sort(-1).values, torch.arange(200).expand(1, 2, 200))


def test_budget_mode_keeps_ceil_keep_blocks_by_projected_mass(skewed):
    q, k, _ = skewed(seed=2, n=160)
    sel = SVG2(keep=0.3, q_clusters=5, k_clusters=12, iterations=5, block_q=16, block_k=16)
    layout = sel(q, k, scale=0.25)
    assert bool((layout.kv_counts == math.ceil(0.3 * 10)).all())
    q_km, k_km = sel.cluster(q, k)
    mass = cluster_pair_mass(q_km, k_km, 0.25)
    kept = layout.to_dense()
    for h in range(2):
        # S_mj = mean over the block's queries of sum_b P(a_i, b) * (keys of b in j) / |b|
        q_lab = q_km.labels[0, h, layout.q_perm[0, h]]
        k_lab = k_km.labels[0, h, layout.kv_perm[0, h]]
        per_key = mass[0, h][:, k_lab] / k_km.sizes[0, h, k_lab]  # (Cq, Nk)
        per_block = torch.stack([per_key[:, j : j + 16].sum(1) for j in range(0, 160, 16)], 1)
        score = torch.stack([per_block[q_lab[i : i + 16]].mean(0) for i in range(0, 160, 16)])
        low = score.masked_fill(~kept[0, h], math.inf).amin(-1)
        high = score.masked_fill(kept[0, h], -math.inf).amax(-1)
        assert bool((low >= high - 1e-12).all())


def test_top_p_mode_covers_every_selected_cluster_pair(skewed):
    q, k, _ = skewed(seed=3, n=120)
    sel = SVG2(
        top_p=0.6, min_kc_ratio=0.2, q_clusters=4, k_clusters=10, iterations=5, block_q=8, block_k=8
    )
    layout = sel(q, k, scale=0.3)
    q_km, k_km = sel.cluster(q, k)
    mass = cluster_pair_mass(q_km, k_km, 0.3)
    tokens = layout.token_mask()
    for h in range(2):
        selected = torch.zeros(4, 10, dtype=torch.bool)
        for a in range(4):
            probs, order = mass[0, h, a].sort(descending=True)
            count = max(2, int((probs.cumsum(0) - probs < 0.6).sum()))  # min 0.2 * 10 clusters
            selected[a, order[:count]] = True
        q_lab = q_km.labels[0, h, layout.q_perm[0, h]]
        k_lab = k_km.labels[0, h, layout.kv_perm[0, h]]
        needed = selected[q_lab][:, k_lab]  # token pairs of selected cluster pairs
        assert bool(tokens[0, h][needed].all())
        # and nothing else: a kept block holds at least one needed token pair
        for m, j in layout.to_dense()[0, h].nonzero().tolist():
            assert bool(needed[8 * m : 8 * m + 8, 8 * j : 8 * j + 8].any())


def test_warm_start_through_state(skewed):
    q, k, v = skewed(seed=4, n=128)
    sel = SVG2(keep=0.5, q_clusters=4, k_clusters=8, iterations=6, warm_iterations=2)
    state = SVG2State()
    first = sel(q, k, scale=0.2, state=state)
    cold_q = kmeans(q, 4, 6, seed=0)
    assert torch.equal(state.q_centroids, cold_q.centroids) and state.calls == 1
    assert torch.equal(first.q_perm, torch.argsort(cold_q.labels, dim=-1, stable=True))
    q2, k2 = q + 0.05 * torch.randn_like(q), k + 0.05 * torch.randn_like(k)
    before_q, before_k = state.q_centroids, state.k_centroids
    second = sel(q2, k2, scale=0.2, state=state)
    warm_q = kmeans(q2, 4, 2, init=before_q)
    warm_k = kmeans(k2, 8, 2, init=before_k)
    assert torch.equal(state.q_centroids, warm_q.centroids)
    assert torch.equal(state.k_centroids, warm_k.centroids) and state.calls == 2
    assert torch.equal(second.kv_perm, torch.argsort(warm_k.labels, dim=-1, stable=True))
    stateless = sel(q2, k2, scale=0.2)  # no state: a fresh 6-step clustering, nothing kept
    assert torch.equal(
        stateless.q_perm, torch.argsort(kmeans(q2, 4, 6).labels, dim=-1, stable=True)
    )
    out = tailattn.attention(q, k, v, "svg2+uta", keep=0.5, q_clusters=4, state=SVG2State())
    assert torch.isfinite(out).all()


def test_svg2_runs_at_a_keep_through_attention(skewed):
    q, k, v = skewed(seed=5, n=256)
    out, info = tailattn.attention(
        q, k, v, "svg2(iterations=5)+uta", keep=0.25, block_q=64, block_k=64, return_info=True
    )
    assert info["density"] == pytest.approx(0.25)  # one of four key blocks, no ragged block
    assert info["layout"].q_perm.shape == (1, 2, 256)
    ref = tailattn.full_attention(q, k, v)
    drop = tailattn.attention(q, k, v, "svg2(iterations=5)", keep=0.25, block_q=64, block_k=64)
    assert tailattn.metrics.mse(out, ref) < tailattn.metrics.mse(drop, ref)


def test_bad_state_and_parameters(skewed):
    q, k, _ = skewed(seed=6, n=64)
    sel = SVG2(keep=0.5, q_clusters=4, k_clusters=4, iterations=2)
    with pytest.raises(TypeError, match="state must be an SVG2State or None"):
        sel(q, k, scale=0.2, state={"centroids": None})
    state = SVG2State(q_centroids=torch.zeros(1, 2, 3, 32))
    with pytest.raises(ValueError, match=r"state.q_centroids has shape \(1, 2, 3, 32\)"):
        sel(q, k, scale=0.2, state=state)
    with pytest.raises(ValueError, match="min_kc_ratio must be in"):
        SVG2(min_kc_ratio=1.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        SVG2(top_p=0)
    with pytest.raises(ValueError, match="q_clusters must be positive"):
        SVG2(q_clusters=0)
    with pytest.raises(TypeError, match="seed must be an integer"):
        SVG2(seed=1.5)


def _checked(layout):
    """The layout rebuilt with validation on (raises if it is not a valid layout)."""
    from tailattn.layout import BlockLayout

    fields = ("kv_indices", "kv_counts", "n_q", "n_k", "block_q", "block_k", "q_perm", "kv_perm")
    return BlockLayout(*(getattr(layout, f) for f in fields), check=True)


@pytest.mark.parametrize("keep", [None, 0.2])
def test_identical_batch_items_and_heads_get_identical_results(keep):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=gen).expand(2, -1, -1, -1) for _ in range(3))
    out, info = tailattn.attention(q, k, v, "svg2+uta", keep=keep, return_info=True)
    assert torch.equal(out[0], out[1])  # issue 13: was 0.73 apart
    layout = info["layout"]
    for name in ("kv_indices", "kv_counts", "q_perm", "kv_perm"):
        assert torch.equal(getattr(layout, name)[0], getattr(layout, name)[1]), name
    heads = [x[:1, :1].expand(1, 3, -1, -1) for x in (q, k, v)]
    out_h = tailattn.attention(*heads, "svg2+uta", keep=keep)
    assert torch.equal(out_h[:, 0], out_h[:, 1]) and torch.equal(out_h[:, 0], out_h[:, 2])
    assert torch.equal(out_h[0, 0], out[0, 0])  # and the same as at another batch place
    again = tailattn.attention(q, k, v, "svg2+uta", keep=keep)
    assert torch.equal(again, out)


@pytest.mark.parametrize("keep", [None, 0.3])
def test_layouts_pass_validation(skewed, keep):
    q, k, _ = skewed(seed=7, n=200)
    sel = SVG2(keep=keep, q_clusters=6, k_clusters=12, iterations=4, block_q=32, block_k=32)
    layout = _checked(sel(q, k, scale=0.2))
    assert bool((layout.kv_counts >= 1).all())
    state = SVG2State()
    sel(q, k, scale=0.2, state=state)
    _checked(sel(q, k, scale=0.2, state=state))


def test_kmeans_backend_parameter():
    assert SVG2(kmeans_backend="reference").kmeans_backend == "reference"
    with pytest.raises(ValueError, match="kmeans_backend must be one of"):
        SVG2(kmeans_backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run k-means"):
        tailattn.attention(
            *(torch.randn(1, 1, 32, 16, dtype=torch.float64),) * 3,
            "svg2(kmeans_backend=triton)",
            keep=0.5,
        )


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (torch.cuda.is_available() or INTERPRET),
    reason="needs Triton with CUDA or TRITON_INTERPRET=1",
)


@needs_kernels
@pytest.mark.parametrize("keep", [None, 0.5])
def test_kernel_kmeans_gives_the_reference_layout(skewed, keep):
    q, k, _ = (x.float().to(DEVICE) for x in skewed(seed=9, n=128))
    params = dict(keep=keep, q_clusters=4, k_clusters=8, iterations=2, block_q=32, block_k=32)
    fast = SVG2(**params, kmeans_backend="triton")
    ref = SVG2(**params, kmeans_backend="reference")
    states = SVG2State(), SVG2State()
    for _ in range(2):  # cold, then warm-started from the state
        a = _checked(fast(q, k, scale=0.2, state=states[0]))
        b = ref(q, k, scale=0.2, state=states[1])
        for name in ("kv_indices", "kv_counts", "q_perm", "kv_perm"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert states[0].calls == 2
    assert float((states[0].k_centroids - states[1].k_centroids).abs().max()) < 1e-5


@needs_kernels
def test_kernel_kmeans_keeps_identical_batch_items_identical(skewed):
    twins = [x[:, :1].float().to(DEVICE).expand(2, 2, -1, -1) for x in skewed(seed=10, n=64)]
    spec = "svg2(q_clusters=3, k_clusters=5, iterations=2, kmeans_backend=triton)+uta"
    out = tailattn.attention(*twins, spec, keep=0.5, block_q=32, block_k=32)
    assert all(torch.equal(out[i, j], out[0, 0]) for i in range(2) for j in range(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("keep", [None, 0.2])
def test_selection_is_sync_free_and_graph_capturable(keep):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (
        torch.randn(2, 3, 4000, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(2)
    )
    sel, scale = SVG2(keep=keep, iterations=5), 128**-0.5
    stream = torch.cuda.Stream()  # warm up and capture on one stream (lazy inits before capture)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        state = SVG2State()
        sel(q, k, scale=scale, state=state)  # compiles the kernels, fills the state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cold = sel(q, k, scale=scale)
            warm = sel(q, k, scale=scale, state=SVG2State(state.q_centroids, state.k_centroids))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured_cold = sel(q, k, scale=scale)
        captured_warm = sel(
            q, k, scale=scale, state=SVG2State(state.q_centroids, state.k_centroids)
        )
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in ((captured_cold, cold), (captured_warm, warm)):
        _checked(got)
        for name in ("kv_indices", "kv_counts", "q_perm", "kv_perm"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name

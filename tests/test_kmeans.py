"""Token permutations and SVG2's batched k-means."""

import itertools

import pytest
import torch

from tailattn.permute import permute_tokens, unpermute_tokens
from tailattn.select.kmeans import (
    assign_clusters,
    cluster_permutation,
    cluster_sums,
    initial_positions,
    kmeans,
    prefix_cluster_sums,
)


def points(seed=0, b=1, h=2, n=300, d=6):
    gen = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(b, h, 5, d, generator=gen)
    pick = torch.randint(0, 5, (b, h, n, 1), generator=gen).expand(b, h, n, d)
    return torch.gather(centers, 2, pick) + torch.randn(b, h, n, d, generator=gen)


def inertia(x, result):
    nearest = result.centroids.gather(2, result.labels.unsqueeze(-1).expand_as(x))
    return float(((x.double() - nearest.double()) ** 2).sum())


@pytest.mark.parametrize("shared", [True, False])
def test_permute_then_unpermute_is_identity(shared):
    x = torch.randn(2, 3, 50, 4)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(50, generator=gen)
    if not shared:
        perm = torch.stack([torch.randperm(50, generator=gen) for _ in range(6)]).view(2, 3, 50)
    y = permute_tokens(x, perm)
    row = perm if shared else perm[1, 2]
    assert torch.equal(y[1, 2], x[1, 2, row])
    assert torch.equal(unpermute_tokens(y, perm), x)
    assert torch.equal(unpermute_tokens(y[..., 0], perm), x[..., 0])


def test_cluster_permutation_is_stable_and_contiguous():
    labels = torch.tensor([[[2, 0, 1, 0, 2, 1, 0]]])
    perm = cluster_permutation(labels)
    assert perm.tolist() == [[[1, 3, 6, 2, 5, 0, 4]]]


def test_assignment_and_sums_against_brute_force():
    x = points(seed=2).double()
    centroids = x[:, :, :7].clone()
    labels = assign_clusters(x, centroids, chunk_bytes=1000)
    dist = ((x.unsqueeze(3) - centroids.unsqueeze(2)) ** 2).sum(-1)
    assert torch.equal(labels, dist.argmin(-1))
    for sums, sizes in (cluster_sums(x, labels, 7), prefix_cluster_sums(x, labels, 7)):
        for c in range(7):
            members = labels[0, 1] == c
            assert int(sizes[0, 1, c]) == int(members.sum())
            assert (sums[0, 1, c] - x[0, 1, members].sum(0)).abs().max() < 1e-12


def test_kmeans_is_deterministic_with_a_seed():
    x = points(seed=3)
    a = kmeans(x, 9, 10, seed=4)
    b = kmeans(x.clone(), 9, 10, seed=4)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.sizes.sum(-1), torch.full((1, 2), 300))
    assert torch.equal(a.perm, cluster_permutation(a.labels))
    other = kmeans(x, 9, 10, seed=5)  # another seed starts from other tokens
    assert not torch.equal(other.centroids, a.centroids)


def test_lloyd_steps_never_increase_the_inertia():
    x = points(seed=6)
    start = kmeans(x, 12, 1, seed=0).centroids
    values = [inertia(x, kmeans(x, 12, steps, init=start)) for steps in (1, 2, 4, 8, 16)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(values))
    assert values[-1] < values[0]


def test_warm_start_continues_where_the_last_run_stopped():
    x = points(seed=7)
    ten = kmeans(x, 6, 10, seed=1)
    resumed = kmeans(x, 6, 5, init=kmeans(x, 6, 5, seed=1).centroids)
    assert torch.allclose(resumed.centroids, ten.centroids, atol=1e-5)
    assert torch.equal(resumed.labels, ten.labels)


def test_kmeans_bad_arguments():
    x = points(seed=8, n=20)
    with pytest.raises(ValueError, match="n_clusters must be at most the number of tokens 20"):
        kmeans(x, 21, 3)
    with pytest.raises(ValueError, match="iterations must be positive"):
        kmeans(x, 4, 0)
    with pytest.raises(ValueError, match=r"init must have shape \(1, 2, 4, 6\)"):
        kmeans(x, 4, 3, init=torch.zeros(1, 2, 5, 6))


@pytest.mark.parametrize(("n", "c"), [(300, 9), (1000, 434), (7, 7), (5, 1)])
def test_initial_positions_take_one_token_per_stratum(n, c):
    picks = initial_positions(n, c, seed=3)
    strata = torch.arange(c) * n // c
    assert picks.dtype == torch.int64 and picks.shape == (c,)
    assert bool((picks >= strata).all()) and bool((picks < (torch.arange(c) + 1) * n // c).all())
    assert torch.equal(initial_positions(n, c, seed=3), picks)
    if n >= 2 * c:
        assert not torch.equal(initial_positions(n, c, seed=4), picks)
        assert not torch.equal(initial_positions(n, c, seed=-3), picks)


def test_every_batch_head_is_clustered_on_its_own():
    x = points(seed=9, b=1, h=2)
    batch = torch.cat([x.flip(1), x, x], dim=0)  # head 0 of x sits at (0, 1), (1, 0), (2, 0)
    whole = kmeans(batch, 7, 4, seed=2)
    alone = kmeans(x[:, :1], 7, 4, seed=2)
    for b, h in ((0, 1), (1, 0), (2, 0)):
        assert torch.equal(whole.centroids[b, h], alone.centroids[0, 0])
        assert torch.equal(whole.labels[b, h], alone.labels[0, 0])

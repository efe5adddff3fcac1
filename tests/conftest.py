from collections.abc import Callable

import pytest
import torch

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _skewed_qkv(
    seed: int = 0,
    b: int = 1,
    h: int = 2,
    n: int = 256,
    d: int = 32,
    dtype: torch.dtype = torch.float64,
) -> QKV:
    """Clustered keys and queries aligned with the clusters: a few keys hold most of the mass
    and a long, flat tail holds the rest, as in video-DiT attention."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, 8, d, generator=gen, dtype=dtype)
    k_assign = torch.randint(0, 8, (b, h, n, 1), generator=gen).expand(b, h, n, d)
    q_assign = torch.randint(0, 8, (b, h, n, 1), generator=gen).expand(b, h, n, d)
    k = torch.gather(centers, 2, k_assign) + 0.7 * torch.randn(
        b, h, n, d, generator=gen, dtype=dtype
    )
    q = 2.0 * torch.gather(centers, 2, q_assign) + 0.5 * torch.randn(
        b, h, n, d, generator=gen, dtype=dtype
    )
    v = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    return q, k, v


@pytest.fixture
def skewed() -> Callable[..., QKV]:
    return _skewed_qkv

"""Grid-local q, k, v for the seed-method tests: nearby tokens of the (T, H, W) grid have
similar queries and keys, so attention concentrates around each query, as in video DiTs."""

import torch


def grid_qkv(
    grid: tuple[int, int, int],
    *,
    heads: int = 2,
    d: int = 32,
    text_tokens: int = 0,
    sharpness: float = 2.0,
    length: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, heads, N, d) tensors, N = T*H*W + text_tokens; video tokens first in (t, h, w) order.

    Features are random Fourier features of the grid position over ``length`` grid units, the
    same along t, h and w (a smooth, isotropic field over the grid), plus noise; text tokens
    are random.
    """
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    ids = torch.arange(t * h * w)
    pos = torch.stack([ids // (h * w), ids // w % h, ids % w], dim=1).to(dtype)
    pos = pos / length
    freqs = torch.randn(heads, 3, d // 2, generator=gen, dtype=dtype)
    phase = torch.einsum("nc,hcf->hnf", pos, freqs)
    field = torch.cat([phase.cos(), phase.sin()], dim=-1) * sharpness

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x + 0.3 * torch.randn(x.shape, generator=gen, dtype=dtype)

    q, k = noisy(field), noisy(field)
    v = torch.randn(heads, t * h * w, d, generator=gen, dtype=dtype)
    if text_tokens:
        extra = [torch.randn(heads, text_tokens, d, generator=gen, dtype=dtype) for _ in range(3)]
        q, k, v = (torch.cat([x, e], dim=1) for x, e in zip((q, k, v), extra, strict=True))
    return q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)

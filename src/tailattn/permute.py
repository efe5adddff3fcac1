r"""Token permutations and their inverses.

A permutation ``perm`` of N tokens is an int64 tensor, (N,) shared by every head or (B, H, N) per
head; position j of the permuted sequence holds original token ``perm[..., j]``
(:class:`~tailattn.layout.BlockLayout` uses the same convention). Selections that reorder tokens
(SVG2's clusters, DFSAttn's and Rectified's curves) produce such permutations; executors and
kernels apply them to q, k, v and undo them on the output.
"""

from __future__ import annotations

import torch


def permute_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``x[..., perm[..., j], :]`` along the token axis of a (B, H, N, D) tensor."""
    if perm is None:
        return x
    if perm.ndim == 1:
        return x.index_select(2, perm.to(x.device))
    return x.gather(2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))


def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`permute_tokens`: returns y with ``y[..., perm[..., j], :] = x[..., j, :]``.

    ``x`` may be (B, H, N, D) or (B, H, N) (per-token values such as an lse).
    """
    if perm is None:
        return x
    squeeze = x.ndim == 3
    x4 = x.unsqueeze(-1) if squeeze else x
    if perm.ndim == 1:
        index = perm.view(1, 1, -1, 1).expand_as(x4)
    else:
        index = perm.unsqueeze(-1).expand_as(x4)
    out = torch.empty_like(x4).scatter_(2, index, x4)
    return out.squeeze(-1) if squeeze else out


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv[..., perm[..., j]] = j."""
    inv = torch.empty_like(perm)
    arange = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return inv.scatter_(-1, perm, arange)

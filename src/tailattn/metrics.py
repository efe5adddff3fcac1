r"""Accuracy metrics against exact attention.

Output metrics take an approximate output and the exact one, both (B, H, N, Dv) (``bhnd``), and
return a float averaged over everything, or with ``per_head=True`` a (H,) tensor averaged over
batch, queries and channels:

* ``mse``      mean((o - o*)^2)
* ``rel_l2``   ||o - o*|| / ||o*|| per query row, averaged
* ``cosine``   cos(o, o*) per query row, averaged

Distribution metrics act on a chunk of exact logits z (..., Cq, Nk) and return per-query values:

* ``recall``           sum_{i in T} p_i, the exact probability mass of the kept set
* ``tail_mass_error``  sum_t e^{z_t} / sum_{i in D} e^{z_i} - 1, the relative error of the
                       tail's mass as the estimator represents it; for ``uta`` this is the
                       Jensen gap, always <= 0 (mean of exp >= exp of mean)
* ``implied_tv``       total variation 1/2 sum_i |p_i - p~_i| between the exact distribution
                       and the one a method implies (each tail token's weight spread evenly
                       over its members)
"""

from __future__ import annotations

import torch


def _rows(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != ref.shape:
        raise ValueError(
            f"output shape {tuple(x.shape)} does not match reference {tuple(ref.shape)}"
        )
    if x.ndim != 4:
        raise ValueError(f"outputs must be 4-D (B, H, N, Dv), got shape {tuple(x.shape)}")
    dtype = torch.float64 if torch.float64 in (x.dtype, ref.dtype) else torch.float32
    return x.to(dtype), ref.to(dtype)


def _reduce(per_row: torch.Tensor, per_head: bool) -> torch.Tensor | float:
    """(B, H, N) -> (H,) when per_head, else a float."""
    return per_row.mean(dim=(0, 2)) if per_head else float(per_row.mean())


def mse(out: torch.Tensor, ref: torch.Tensor, per_head: bool = False) -> torch.Tensor | float:
    """Mean squared error ``mean((o - o*)^2)``."""
    x, r = _rows(out, ref)
    return _reduce(((x - r) ** 2).mean(dim=-1), per_head)


def rel_l2(out: torch.Tensor, ref: torch.Tensor, per_head: bool = False) -> torch.Tensor | float:
    """Relative L2 error per query row ``||o - o*|| / ||o*||``, averaged."""
    x, r = _rows(out, ref)
    den = r.norm(dim=-1).clamp_min(torch.finfo(r.dtype).tiny)
    return _reduce((x - r).norm(dim=-1) / den, per_head)


def cosine(out: torch.Tensor, ref: torch.Tensor, per_head: bool = False) -> torch.Tensor | float:
    """Cosine similarity per query row, averaged."""
    x, r = _rows(out, ref)
    return _reduce(torch.nn.functional.cosine_similarity(x, r, dim=-1, eps=1e-30), per_head)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, object]:
    """All output metrics: ``mse``, ``rel_l2``, ``cosine`` as floats, plus ``per_head`` lists."""
    names = {"mse": mse, "rel_l2": rel_l2, "cosine": cosine}
    result: dict[str, object] = {name: fn(out, ref) for name, fn in names.items()}
    result["per_head"] = {name: fn(out, ref, per_head=True).tolist() for name, fn in names.items()}
    return result


def recall(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Exact probability mass of the kept keys, per query: (..., Cq, Nk) -> (..., Cq)."""
    lse_full = torch.logsumexp(logits, dim=-1)
    lse_kept = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), dim=-1)
    return torch.exp(lse_kept - lse_full)


def tail_mass_error(
    logits: torch.Tensor, kept: torch.Tensor, token_logits: torch.Tensor
) -> torch.Tensor:
    """Relative error of the represented tail mass, per query; 0 where the tail is empty.

    ``token_logits`` (..., Cq, T) are the tail tokens' logits (log of the mass they stand for).
    """
    exact = torch.logsumexp(logits.masked_fill(kept, float("-inf")), dim=-1)
    if token_logits.shape[-1] == 0:
        est = torch.full_like(exact, float("-inf"))
    else:
        est = torch.logsumexp(token_logits, dim=-1)
    err = torch.expm1(est - exact)
    return torch.where(torch.isfinite(exact), err, torch.zeros_like(err))


def implied_tv(
    logits: torch.Tensor,
    kept: torch.Tensor,
    implied: torch.Tensor,
    lse_method: torch.Tensor,
) -> torch.Tensor:
    """Total variation between exact and implied distributions, per query.

    Args:
        logits: (..., Cq, Nk) exact logits.
        kept: (..., Cq, Nk) bool, keys computed exactly.
        implied: (..., Cq, Nk) logit each dropped key implicitly receives (-inf: none).
        lse_method: (..., Cq) log-sum-exp of the method's softmax (kept keys + tail tokens).
    """
    p = torch.softmax(logits, dim=-1)
    approx = torch.exp(torch.where(kept, logits, implied) - lse_method.unsqueeze(-1))
    return 0.5 * (p - approx).abs().sum(dim=-1)

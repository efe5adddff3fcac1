"""The public entry point :func:`attention`."""

from __future__ import annotations

from typing import Any

import torch

from . import execute
from ._checks import check_grid, check_layout, check_qkv, check_scale
from .methods import BoundMethod, Method, registry


def _add_stats(info: dict[str, Any], stats: dict[str, torch.Tensor]) -> None:
    """Per-query stats (B, H, Nq) into the info dict: overall means and per-head means."""
    for name, value in stats.items():
        info[name] = float(value.mean())
        info.setdefault("per_head", {})[name] = value.mean(dim=(0, 2)).tolist()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str | Method | BoundMethod = "full",
    *,
    keep: float | None = None,
    grid: tuple[int, int, int] | None = None,
    layout: str = "bhnd",
    scale: float | None = None,
    return_info: bool = False,
    state: Any = None,
    backend: str | None = None,
    **params: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Sparse attention: the selected keys exactly, the dropped tail through a tail estimator.

    ``O = (sum_T e^{z_i} v_i + sum_t e^{z_t} v_t) / (sum_T e^{z_i} + sum_t e^{z_t})`` with
    ``z_i = s q.k_i``, kept set T from the selection and tail tokens t from the tail (Eq. 14).

    Args:
        q: (B, H, Nq, D), or (B, Nq, H, D) with ``layout="bnhd"``.
        k: (B, H, Nk, D), same layout.
        v: (B, H, Nk, Dv), same layout.
        method: spec string ``SELECTION[(k=v,...)][+TAIL[(k=v,...)]]`` such as ``"topk+uta"``,
            ``"topp(p=0.9)+bins8"``, a :class:`~tailattn.methods.Method`, or a
            :class:`~tailattn.methods.BoundMethod` from ``tailattn.registry.bind(...)`` (bound
            once, run many times: then ``keep`` and parameters go to ``bind``).
        keep: keep ratio in (0, 1] for budgeted selections (fraction of keys kept per query, or
            of key blocks per query block for block selections).
        grid: latent video grid (T, H, W) with T * H * W = Nk (plus the method's
            ``text_tokens``, kept last), for grid-based methods (``radial``, ``window``,
            ``dfs``, ``rectified``); checked when given.
        layout: ``"bhnd"`` or ``"bnhd"``.
        scale: logit scale s, default 1/sqrt(D).
        return_info: also return a dict with ``method`` (canonical spec), ``density`` (measured
            kept fraction), ``lse`` (B, H, Nq), and for oracle and block methods the mean and
            per-head ``recall``, ``budget``, ``tail_mass_error`` and ``implied_tv``; block methods
            add ``layout``, the :class:`~tailattn.layout.BlockLayout` they ran; fused methods
            (``blasst``, ``recall``, ``rectified``) add their own entries (see their classes).
        state: per-layer state for selections that keep some across calls (an
            :class:`~tailattn.select.SVG2State` for ``svg2``: k-means centroids to warm-start
            from; a :class:`~tailattn.select.DFSState` for ``dfs``: the mask cache over
            diffusion steps); selections without state ignore it.
        backend: for block and fused methods, ``"triton"`` (the Triton kernels: CUDA, or the
            Triton interpreter), ``"reference"`` (PyTorch, any device), or ``None`` to use a
            kernel whenever it can run these inputs (CUDA, Triton installed, block sizes 64/128,
            head dims 16, 32, 64 or 128, float16/bfloat16/float32, no gradients needed: the
            kernels are forward-only, so inputs that require grad take the reference). With a
            kernel, ``return_info`` reports ``density``, ``lse`` and ``layout`` but not the
            exact statistics, which need the full logits (use ``backend="reference"``).
        **params: method parameters by name (e.g. ``p=0.9``), as an alternative to writing
            them in the spec; giving one both ways with different values is an error.

    Returns:
        The output in the input's layout and dtype, and the info dict with ``return_info``.
    """
    layout = check_layout(layout)
    backend = execute.check_backend(backend)
    bound = registry.resolve(method, keep=keep, **params)
    q4, k4, v4 = check_qkv(q, k, v, layout, finite=False)
    s = check_scale(scale, q4.shape[-1])
    if grid is not None:
        check_grid(grid, k4.shape[2], getattr(bound.selection, "text_tokens", 0))
    result = bound(
        q4, k4, v4, scale=s, grid=grid, state=state, backend=backend, with_stats=return_info
    )
    out = result.out.to(q4.dtype)
    if layout == "bnhd":
        out = out.transpose(1, 2)
    if not return_info:
        return out
    info: dict[str, Any] = {"method": bound.spec}
    _add_stats(info, result.stats)
    info.update(result.info)
    info["lse"] = result.lse
    return out, info

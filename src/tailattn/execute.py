"""How a bound method of each granularity runs: one runner per :class:`Granularity`.

    dense   exact attention (:func:`tailattn.reference.full_attention`)
    token   exact logits per query chunk -> kept mask -> exact kept part + token tail
            (:func:`tailattn.reference.oracle_attention`; the oracle study's ground)
    block   layout = selection(q, k) -> the fused Triton kernel with ``tail.kernel`` inside and
            then ``tail.epilogue`` (CUDA), or the reference executor
            (:func:`tailattn.reference.block_attention`, any device)
    fused   the selection attends itself (``selection.attend``) and merges its tail

Every runner takes validated (B, H, N, D) tensors and returns a :class:`~tailattn.contract.Result`.
Nothing here synchronizes with the device on the kernel path: statistics and info entries that
need the host (density, exact recall) are computed only when ``with_stats`` asks for them.

NaN and Inf: the reference paths reject them (:func:`check_values`, a ``ValueError`` naming the
tensor), because a sparse method would otherwise spread them or silently drop them. The CUDA
kernel path does not look at values: a check costs a device sync and would stop CUDA-graph
capture, so there NaN/Inf inputs give NaN/Inf outputs in the rows they reach (as dense SDPA
does); check with ``torch.isfinite`` first, or run ``backend="reference"``, when inputs may be
bad. Under ``torch.compile`` the check is skipped (a data-dependent branch breaks the graph).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ._checks import check_finite, triton_installed
from .contract import Grid, Result
from .layout import BlockLayout
from .methods import BoundMethod, Granularity, registry
from .reference import block_attention, full_attention, oracle_attention

BACKENDS = (None, "reference", "triton")
"""``backend=`` values: the kernel where it can run (``None``), always the PyTorch reference,
or always the kernel (an error where it cannot run)."""


def check_backend(backend: object) -> str | None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def check_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Reject NaN/Inf in q, k, v on the reference paths (module docstring)."""
    if torch.compiler.is_compiling():
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(x, name)


def _no_kernel(bound: BoundMethod, backend: str | None) -> None:
    if backend == "triton":
        raise ValueError(
            f"backend='triton' runs block and fused methods; {bound.spec!r} is a "
            f"{bound.granularity.value} method (use backend=None or 'reference')"
        )


def choose_kernel(
    backend: str | None,
    tensors: tuple[torch.Tensor, ...],
    unsupported: Callable[[], str | None],
    *,
    what: str = "",
) -> bool:
    """Whether to run a Triton kernel: always with ``backend="triton"`` (an error naming the
    reason when it cannot), on CUDA by default, never with ``backend="reference"``.

    The kernels are forward-only, so inputs that need gradients (autograd on, some tensor with
    ``requires_grad``) take the reference path, which differentiates. ``unsupported()`` says why
    the kernel cannot take the inputs otherwise (``None`` when it can); ``what`` names the work
    in the error message."""
    check_backend(backend)
    q = tensors[0]
    if backend == "reference" or (backend is None and q.device.type != "cuda"):
        return False
    reason = None
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        reason = "the inputs need gradients and the kernels are forward-only"
    elif not triton_installed():
        reason = "Triton is not installed"
    elif q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"the inputs are on {q.device.type}, not CUDA"
    else:
        reason = unsupported()
    if reason is not None and backend == "triton":
        raise ValueError(f"backend='triton' cannot run{' ' + what if what else ''}: {reason}")
    return reason is None and (backend == "triton" or q.device.type == "cuda")


def use_kernel(
    backend: str | None,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tail: Any,
    layout: BlockLayout,
) -> bool:
    """:func:`choose_kernel` for the fused block-sparse kernel and a block layout."""

    def unsupported() -> str | None:
        from .kernels import unsupported_reason

        return tail_unsupported(tail) or unsupported_reason(tensors[0], tensors[2], layout)

    return choose_kernel(backend, tensors, unsupported)


def tail_unsupported(tail: Any) -> str | None:
    """Why a block tail cannot run on the kernels: it declares no kernel form."""
    if getattr(tail, "kernel", None) is None:
        return f"tail {type(tail).__name__} has no kernel form (its kernel is None)"
    return None


@registry.runner(Granularity.DENSE)
def run_dense(
    bound: BoundMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    grid: Grid | None = None,
    state: Any = None,
    backend: str | None = None,
    with_stats: bool = False,
) -> Result:
    """Exact dense attention."""
    _no_kernel(bound, backend)
    check_values(q, k, v)
    out, lse = full_attention(q, k, v, scale, return_lse=True)
    return Result(out, lse, info={"density": 1.0} if with_stats else {})


@registry.runner(Granularity.TOKEN)
def run_token(
    bound: BoundMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    grid: Grid | None = None,
    state: Any = None,
    backend: str | None = None,
    with_stats: bool = False,
) -> Result:
    """An oracle selection on the exact logits of each query chunk, plus its token tail."""
    _no_kernel(bound, backend)
    check_values(q, k, v)
    out, lse, stats = oracle_attention(
        q, k, v, bound.selection, bound.tail, scale, with_stats=with_stats
    )
    return Result(out, lse, stats)


@registry.runner(Granularity.BLOCK)
def run_block(
    bound: BoundMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    grid: Grid | None = None,
    state: Any = None,
    backend: str | None = None,
    with_stats: bool = False,
) -> Result:
    """The selection's layout, then the fused kernel (plus the tail's epilogue) or the
    reference executor. With ``with_stats`` the info has ``density`` and ``layout``; the
    reference path adds the exact per-query statistics."""
    layout = bound.selection(q, k, scale=scale, grid=grid, state=state)
    stats: dict[str, torch.Tensor] = {}
    if use_kernel(backend, (q, k, v), bound.tail, layout):
        from .kernels import block_sparse_attention

        out, lse = block_sparse_attention(q, k, v, layout, bound.tail.kernel, scale)
        out, lse = bound.tail.epilogue(q, k, v, layout, out, lse, scale)
    else:
        check_values(q, k, v)
        out, lse, stats = block_attention(q, k, v, layout, bound.tail, scale, with_stats=with_stats)
    info = {"density": layout.density(), "layout": layout} if with_stats else {}
    return Result(out, lse, stats, info)


@registry.runner(Granularity.FUSED)
def run_fused(
    bound: BoundMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    grid: Grid | None = None,
    state: Any = None,
    backend: str | None = None,
    with_stats: bool = False,
) -> Result:
    """The selection runs the attention itself (:class:`~tailattn.contract.FusedSelection`),
    on its kernel where it has one; it checks values on its reference path."""
    return bound.selection.attend(
        q,
        k,
        v,
        bound.tail,
        scale=scale,
        grid=grid,
        state=state,
        with_stats=with_stats,
        backend=backend,
    )

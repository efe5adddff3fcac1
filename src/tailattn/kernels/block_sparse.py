"""Python entry of the fused block-sparse kernel: checks, permutation, tail statistics, launch.

The tail arrives as a :class:`~tailattn.contract.KernelTail` (what a block tail asks of the
kernel); tails with more to do after the kernel do it in their own ``epilogue``.
"""

from __future__ import annotations

import math

import torch

from ..contract import KernelTail
from ..layout import BlockLayout
from ..permute import permute_tokens, unpermute_tokens
from . import attention as _attn
from .pooling import block_means, block_sums
from .runtime import interpreter_problem

KERNEL_BLOCK_SIZES = (64, 128)
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> str | None:
    """Why the kernel cannot run these inputs (None when it can)."""
    problem = interpreter_problem()
    if problem is not None:
        return problem
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    for name, dim in (("head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
        if dim not in KERNEL_HEAD_DIMS:
            return f"{name} {dim} (the kernel takes {KERNEL_HEAD_DIMS})"
    for name, size in (("block_q", layout.block_q), ("block_k", layout.block_k)):
        if size not in KERNEL_BLOCK_SIZES:
            return f"{name}={size} (the kernel takes {KERNEL_BLOCK_SIZES})"
    return None


def _prepared(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Permuted into the layout's order, with the unit last stride the kernel needs."""
    x = permute_tokens(x, perm)
    return x if x.stride(-1) == 1 else x.contiguous()


def _tail_tensors(
    k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, tail: KernelTail
) -> dict[str, torch.Tensor]:
    """Per-block statistics the tail reads: sums for ``UTA``, pooled tokens for ``BLOCKS``."""
    if tail is KernelTail.DROP:
        return {}
    b, h, _, d = k.shape
    if tail is KernelTail.UTA:
        sums = torch.empty(b, h, layout.num_k_blocks, d + v.shape[-1], device=k.device)
        ksum = block_sums(k, layout.block_k, out=sums[..., :d])
        vsum = block_sums(v, layout.block_k, out=sums[..., d:])
        totals = sums.sum(2)
        return {"ksum": ksum, "vsum": vsum, "ktot": totals[..., :d], "vtot": totals[..., d:]}
    kbar, log_count = block_means(k, layout.block_k, k.dtype)
    vbar, _ = block_means(v, layout.block_k, v.dtype)
    return {"kbar": kbar, "vbar": vbar, "logcnt": log_count, "kept": layout.kept_blocks_int8()}


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    tail: KernelTail = KernelTail.DROP,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over ``layout`` with the tail fused in (Triton).

    Args:
        q: (B, H, Nq, D); any strides with a unit stride on D (a (B, N, H, D) tensor viewed as
            bhnd runs without a copy).
        k: (B, H, Nk, D).
        v: (B, H, Nk, Dv).
        layout: kept key blocks; block sizes 64 or 128; its permutations are applied to the
            inputs and undone on the output.
        tail: what the kernel computes for the dropped blocks (a block tail's ``kernel``).
        scale: logit scale, default 1/sqrt(D).
        out: optional (B, H, Nq, Dv) buffer in q's dtype with a unit stride on Dv to write into.
        config: fixed kernel config (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``)
            instead of autotuning.

    Returns:
        out with q's shape (B, H, Nq, Dv) in q's dtype and original token order, and lse
        (B, H, Nq) float32 (natural log).
    """
    if tail not in set(KernelTail):
        runs = ", ".join(t.value for t in KernelTail)
        raise ValueError(f"the Triton kernel cannot run tail {tail!r}: it runs {runs}")
    tail = KernelTail(tail)
    reason = unsupported_reason(q, v, layout)
    if reason is not None:
        raise ValueError(f"the Triton kernel cannot run {reason}")
    if q.device.type != "cuda" and not _attn.interpreting():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    b, h, n_q, _ = q.shape
    if (tuple(layout.batch_heads), layout.n_q, layout.n_k) != ((b, h), n_q, k.shape[2]):
        raise ValueError(
            f"layout is for (B, H)={layout.batch_heads}, n_q={layout.n_q}, n_k={layout.n_k} but "
            f"the inputs have (B, H)={(b, h)}, Nq={n_q}, Nk={k.shape[2]}"
        )
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qp = _prepared(q, layout.q_perm)
    kp, vp = _prepared(k, layout.kv_perm), _prepared(v, layout.kv_perm)
    shape = (*qp.shape[:3], v.shape[-1])
    if out is not None and (out.shape != shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {shape} in {q.dtype} with a unit last stride")
    result = (
        out
        if out is not None and layout.q_perm is None
        else torch.empty(shape, device=q.device, dtype=q.dtype)
    )
    lse = _attn.launch(
        qp,
        kp,
        vp,
        layout.kv_indices.contiguous(),
        layout.kv_counts.contiguous(),
        layout.block_q,
        layout.block_k,
        s,
        tail,
        _tail_tensors(kp, vp, layout, tail),
        result,
        config,
    )
    if layout.q_perm is not None:
        restored = unpermute_tokens(result, layout.q_perm)
        result = restored if out is None else out.copy_(restored)
        lse = unpermute_tokens(lse, layout.q_perm)
    return result, lse

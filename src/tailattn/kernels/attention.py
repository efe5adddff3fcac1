r"""Fused block-sparse flash attention with the tail inside the kernel (forward, Triton).

One program handles ``BLOCK_M`` query rows of one (batch, head) and walks the kept key blocks of
its query block (the layout's CSR row) with an online softmax in the exp2 domain:

    m' = max(m, rowmax(t)),  l' = l e^{m - m'} + sum_j e^{t_j - m'},
    acc' = acc e^{m - m'} + e^{t - m'} V_tile,      t = s log2(e) q k^T,

accumulating in float32. The tail then joins the same running (m, l, acc) as extra tokens
(the log-sum-exp merge of Eq. 14, done in registers):

* ``TAIL_UTA``: one token per query, logit s q.kbar_D + log N_d with the mean dropped key
  kbar_D = (K_total - sum_{kept j} K_sum_j) / N_d and value vbar_D likewise (Eq. 10-13). The kept
  block sums are gathered in the same loop that visits the kept blocks, so the tail costs
  O(kept blocks * d) per query block, not O(N * d).
* ``TAIL_BLOCKS``: every dropped key block j is one token (s q.kbar_j + log n_j, vbar_j): the
  pooled keys are streamed in tiles of ``BLOCK_P`` with the kept blocks masked out.
* ``TAIL_DROP``: nothing (Top-K renormalization).

The pooled tokens' log counts come in natural log (from :func:`block_means`).

Output: O = acc / l in the input dtype, lse = (m + log2 l) ln 2 in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import KernelTail
from .runtime import interpreting

TAIL_DROP: tl.constexpr = tl.constexpr(0)
TAIL_UTA: tl.constexpr = tl.constexpr(1)
TAIL_BLOCKS: tl.constexpr = tl.constexpr(2)
TAIL_CODES = {KernelTail.DROP: 0, KernelTail.UTA: 1, KernelTail.BLOCKS: 2}

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b; ``UPCAST`` multiplies in float32 (the CPU interpreter mis-multiplies bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _softmax_step(
    m_i, l_i, acc, s, scale, vals, PRECISION: tl.constexpr, UPCAST: tl.constexpr
):  # fmt: skip
    """Fold scores s (M, P) with values (P, Dv) into the running softmax; logits = s * scale
    in the log2 domain (one FMA per score: exp2(s * scale - m))."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)
    p = tl.math.exp2(s * scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _dot(p.to(vals.dtype), vals, acc * alpha[:, None], PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_fwd(
    Q, K, V, KDesc, VDesc, Out, Lse, KvIdx, KvCnt,
    KSum, VSum, KTot, VTot, KBar, VBar, LogCnt, KeptMask,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    sib, sih, sim, scb, sch,
    s_ksb, s_ksh, s_ksm, s_vsb, s_vsh, s_vsm, s_ktb, s_kth, s_vtb, s_vth,
    s_kbb, s_kbh, s_kbm, s_vbb, s_vbh, s_vbm, s_mb, s_mh, s_mm,
    H, N_Q, N_K, M_K, scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, TAIL: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, HAS_DESC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    qblock = pid_m * BLOCK_M // BLOCK_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < N_Q

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    idx_row = KvIdx + b * sib + h * sih + qblock * sim
    count = tl.load(KvCnt + b * scb + h * sch + qblock)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)
    k_kept = tl.zeros([HEAD_D], dtype=tl.float32)
    v_kept = tl.zeros([HEAD_DV], dtype=tl.float32)
    n_kept = tl.zeros([], dtype=tl.int32)

    # exact part: the kept key blocks of this query block
    for i in range(0, count):
        kb = tl.load(idx_row + i)
        for sub in tl.static_range(0, BLOCK_K, BLOCK_N):
            start = kb * BLOCK_K + sub
            cols = start + offs_n
            if USE_TMA:
                # bulk tensor copies; rows past N come back as zeros and are masked below
                k = KDesc.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(BLOCK_N, HEAD_D)
                s = _dot(q, k.T, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
            else:
                k = tl.load(
                    k_base + cols[None, :].to(tl.int64) * skn + offs_d[:, None],
                    mask=cols[None, :] < N_K,
                    other=0.0,
                )
                s = _dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
            if start + BLOCK_N > N_K:  # only the ragged last block pays for the mask
                s = tl.where(cols[None, :] < N_K, s, float("-inf"))
            if USE_TMA:
                v = VDesc.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(BLOCK_N, HEAD_DV)
            else:
                v = tl.load(
                    v_base + cols[:, None].to(tl.int64) * svn + offs_dv[None, :],
                    mask=cols[:, None] < N_K,
                    other=0.0,
                )
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, scale_log2, v, PRECISION, UPCAST)
        if TAIL == TAIL_UTA:
            k_kept += tl.load(KSum + b * s_ksb + h * s_ksh + kb * s_ksm + offs_d)
            v_kept += tl.load(VSum + b * s_vsb + h * s_vsh + kb * s_vsm + offs_dv)
            n_kept += tl.minimum(BLOCK_K, N_K - kb * BLOCK_K)

    # UTA: one token from the mean dropped key and value (Eq. 10-13), merged in registers
    if TAIL == TAIL_UTA:
        n_d = N_K - n_kept
        if n_d > 0:
            k_tail = (tl.load(KTot + b * s_ktb + h * s_kth + offs_d) - k_kept) / n_d
            v_tail = (tl.load(VTot + b * s_vtb + h * s_vth + offs_dv) - v_kept) / n_d
            t = tl.sum(q.to(tl.float32) * k_tail[None, :], axis=1) * scale_log2
            t = t + tl.math.log2(n_d.to(tl.float32))
            m_new = tl.maximum(m_i, t)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(t - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_tail[None, :]
            m_i = m_new

    # blocks: every dropped key block as one pooled token (mean key, mean value, log count)
    if TAIL == TAIL_BLOCKS:
        kbar_base = KBar + b * s_kbb + h * s_kbh
        vbar_base = VBar + b * s_vbb + h * s_vbh
        kept_row = KeptMask + b * s_mb + h * s_mh + qblock * s_mm
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, M_K, BLOCK_P):
            pj = p0 + offs_p
            p_ok = pj < M_K
            dropped = (tl.load(kept_row + pj, mask=p_ok, other=1) == 0) & p_ok
            kbar = tl.load(
                kbar_base + pj[None, :] * s_kbm + offs_d[:, None], mask=p_ok[None, :], other=0.0
            )
            s = _dot(q, kbar, tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32), PRECISION, UPCAST)
            log2_count = tl.load(LogCnt + pj, mask=p_ok, other=0.0) * 1.4426950408889634
            s = s * scale_log2 + log2_count[None, :]
            s = tl.where(dropped[None, :], s, float("-inf"))
            vbar = tl.load(
                vbar_base + pj[:, None] * s_vbm + offs_dv[None, :], mask=p_ok[:, None], other=0.0
            )
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, 1.0, vbar, PRECISION, UPCAST)

    out = acc / l_i[:, None]
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None].to(tl.int64) * son + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


def _set_descriptor_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the TMA descriptors' block shape follows the config's BLOCK_N."""
    if nargs["HAS_DESC"]:
        nargs["KDesc"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_D"]]
        nargs["VDesc"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DV"]]


def _configs() -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma},
            num_warps=w,
            num_stages=s,
            pre_hook=_set_descriptor_blocks,
        )
        for bm, bn, w in ((128, 128, 8), (128, 64, 8), (128, 64, 4), (64, 64, 4))
        for s in (2, 3)
        for tma in (False, True)
    ]


def _prune(configs, named_args, **kwargs):
    block_q, block_k = kwargs["BLOCK_Q"], kwargs["BLOCK_K"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= block_q
        and c.kwargs["BLOCK_N"] <= block_k
        and (kwargs["HAS_DESC"] or not c.kwargs["USE_TMA"])
    ]
    return kept or configs[:1]


_block_sparse_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["HEAD_D", "HEAD_DV", "TAIL", "BLOCK_Q", "BLOCK_K", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_block_sparse_fwd)


def _descriptors(k: torch.Tensor, v: torch.Tensor, config: dict | None) -> tuple:
    """4-D TMA descriptors over the (B, H, N, D) views, or the tensors themselves.

    With a fixed ``config`` its ``USE_TMA`` decides (the interpreter runs both paths); when
    autotuning, descriptors are offered on Hopper and newer.
    """
    if config is not None:
        wanted = bool(config.get("USE_TMA", False))
    else:
        wanted = k.device.type == "cuda" and torch.cuda.get_device_capability(k.device)[0] >= 9
    if not wanted:
        return k, v
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        bn = (config or {}).get("BLOCK_N", 64)
        return tuple(
            TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, bn, x.shape[-1]])
            for x in (k, v)
        )
    except (ImportError, AssertionError):  # strides or alignment a descriptor cannot take
        return k, v


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    tail: KernelTail,
    tail_tensors: dict[str, torch.Tensor],
    out: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Run the kernel on prepared (B, H, N, D) views; returns lse (B, H, Nq) float32.

    ``config`` (``BLOCK_M``, ``BLOCK_N``, optional ``USE_TMA``, ``num_warps``, ``num_stages``)
    skips autotuning; the interpreter defaults to 64 x 64 tiles with pointer loads.
    """
    b, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    dummy = torch.zeros(1, 1, 1, 1, device=q.device, dtype=torch.float32)
    ksum, vsum, kbar, vbar = (tail_tensors.get(n, dummy) for n in ("ksum", "vsum", "kbar", "vbar"))
    ktot, vtot = tail_tensors.get("ktot", dummy[0]), tail_tensors.get("vtot", dummy[0])
    logcnt = tail_tensors.get("logcnt", dummy.view(-1))
    kept = tail_tensors.get("kept", dummy.to(torch.int8))
    if interpreting() and config is None:
        config = {"BLOCK_M": min(64, block_q), "BLOCK_N": min(64, block_k)}
    k_desc, v_desc = _descriptors(k, v, config)
    tensors = (q, k, v, k_desc, v_desc, out, lse, kv_indices, kv_counts)
    tensors = (*tensors, ksum, vsum, ktot, vtot, kbar, vbar)
    strides = [
        *(x.stride()[:3] for x in (q, k, v, out, kv_indices)),
        kv_counts.stride()[:2],
        *(x.stride()[:3] for x in (ksum, vsum)),
        ktot.stride()[:2],
        vtot.stride()[:2],
        *(x.stride()[:3] for x in (kbar, vbar, kept)),
    ]
    args = (*tensors, logcnt, kept, *(st for group in strides for st in group))
    args = (*args, h, n_q, n_k, triton.cdiv(n_k, block_k), scale * LOG2E)
    meta = dict(
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        HEAD_D=d,
        HEAD_DV=dv,
        TAIL=TAIL_CODES[tail],
        BLOCK_P=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        HAS_DESC=k_desc is not k,
    )
    if config is not None:
        grid = (triton.cdiv(n_q, config["BLOCK_M"]), b * h)
        _block_sparse_fwd[grid](*args, **meta, **{**config, "USE_TMA": k_desc is not k})
    else:
        _block_sparse_fwd_tuned[lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), b * h)](*args, **meta)
    return lse

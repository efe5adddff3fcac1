r"""Scoring kernels of the error-aware selection ``block-err`` (:mod:`tailattn.select.error_aware`).

``probe_stats``: per (query block m, key block j), for the probe query qhat_m (the block's mean
query) against every key t of block j, z_t = s qhat_m . k_t,

    log_mass[m, j] = log sum_{t in j} e^{z_t}
    key_sketch[m, j] = sum_{t in j} softmax_j(z)_t (k_t - kbar) S        (optional, (r,))

with kbar the mean key of the head and S a (D, r) sketch matrix. With sketches, one program
per (key block, batch x head) first writes (k - kbar) S (in the keys' dtype, float32 out), once
per key block; then one program per (BLOCK_P probes, key block, batch x head): QK^T on tensor
cores, the block's softmax, and P (k - kbar) S from the sketched keys.

``greedy_drop``: one program per query block: from its row of ``log_mass`` and ``key_sketch``
the block masses p_j, the imbalances d_j = p_j (kap_j - sum_i p_i kap_i), then ``steps`` greedy
steps, each adding the block j that minimises

    J = (|t + d_j|^2 + kappa (rest - |d_j|^2)) / (mass + p_j)^2

(t: the kept imbalance, mass: the kept mass, rest: the sum of |d|^2 over the dropped blocks);
ties go to the lowest id. The row (C x r floats) stays in registers for all steps; the chosen
block's p and d are read back from memory, so a step has one reduction over the key blocks
(the argmin). With ``candidates`` the row is only those C blocks (gathered), and the
normaliser, the mean key and ``rest`` are summed over all Mk blocks in chunks first.

Timed on an H200 at Wan2.1-1.3B 480p (B=1, H=12, 256 x 256 blocks of 128, r = 32, 26 steps;
2026-11-30): ``probe_stats`` with 256 probes per program 0.185 ms for the masses and 0.362 ms
with sketches (64 per program: 0.193 and 0.601 ms; ``triton.testing.do_bench``, one run);
``greedy_drop`` 0.43 ms (0.67 ms with three masked sums per step). At Wan2.1-14B 720p (591 key
blocks, 60 steps) the greedy over every block takes 37.8 ms (a row of 1,024 x 32 floats no
longer fits a program's registers), over 256 candidates 8.7 ms (10.8 ms with choosing them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import interpreting

TINY: tl.constexpr = tl.constexpr(1.1754943508222875e-38)
"""Smallest normal float32: the floor of a denominator (a kernel global must be constexpr)."""
BIG: tl.constexpr = tl.constexpr(3.4028234663852886e38)
"""Largest float32: the ceiling of an objective."""


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with a and b in ``DTYPE``, accumulated in float32; ``UPCAST`` multiplies in float32
    (the CPU interpreter mis-multiplies bf16)."""
    if UPCAST:
        return tl.dot(a.to(DTYPE).to(tl.float32), b.to(DTYPE).to(tl.float32))
    return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def _sketch_kernel(
    K, Shift, Sketch, Out, stride_kb, stride_kh, stride_kn, H, N,
    BLOCK_K: tl.constexpr, D: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """(k_t - kbar) S for the keys of one key block, float32 (B, H, N, R)."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    keys = j * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R)
    real = keys < N
    k_ptrs = K + b * stride_kb + h * stride_kh + keys[:, None].to(tl.int64) * stride_kn
    k = tl.load(k_ptrs + offs_d[None, :], mask=real[:, None], other=0.0)
    shift = tl.load(Shift + bh.to(tl.int64) * D + offs_d)
    centered = tl.where(real[:, None], k.to(tl.float32) - shift[None, :], 0.0)
    sketch = tl.load(Sketch + offs_d[:, None] * R + offs_r[None, :])
    sketched = _dot(centered, sketch, k.dtype, UPCAST)  # (BLOCK_K, R), float32
    rows = bh.to(tl.int64) * N + keys.to(tl.int64)
    tl.store(Out + rows[:, None] * R + offs_r[None, :], sketched, mask=real[:, None])


@triton.jit
def _probe_kernel(
    Q, K, Sketched, LogMass, KeySketch,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    H, MQ, MK, N, scale,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    WITH_KEYS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    j = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    keys = j * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    real = keys < N
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qm
    q = tl.load(q_ptrs + offs_d[None, :], mask=rows[:, None] < MQ, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + keys[:, None].to(tl.int64) * stride_kn
    k = tl.load(k_ptrs + offs_d[None, :], mask=real[:, None], other=0.0)
    z = _dot(q, tl.trans(k), k.dtype, UPCAST) * scale
    z = tl.where(real[None, :], z, float("-inf"))
    top = tl.max(z, axis=1)
    e = tl.exp(z - top[:, None])
    total = tl.sum(e, axis=1)
    out = bh.to(tl.int64) * MQ * MK + rows.to(tl.int64) * MK + j
    tl.store(LogMass + out, top + tl.log(total), mask=rows < MQ)
    if WITH_KEYS:
        offs_r = tl.arange(0, R)
        key_rows = bh.to(tl.int64) * N + keys.to(tl.int64)
        sketched = tl.load(Sketched + key_rows[:, None] * R + offs_r[None, :], mask=real[:, None],
                           other=0.0)  # fmt: skip
        mean = tl.dot(e / total[:, None], sketched)  # (BLOCK_P, R)
        tl.store(KeySketch + out[:, None] * R + offs_r[None, :], mean, mask=rows[:, None] < MQ)


def probe_stats(
    qhat: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    block_k: int,
    sketch: torch.Tensor | None,
    block_p: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probe log masses (B, H, Mq, Mk) and, with ``sketch`` (D, r) float32, the sketched
    attention-weighted mean keys (B, H, Mq, Mk, r), both float32.

    Args:
        qhat: (B, H, Mq, D) probe queries and k: (B, H, N, D) keys, both with unit stride on D;
            D, r and ``block_k`` powers of two >= 16.
        block_p: probes per program, a power of two >= 16 (default: Mq rounded up to a power of
            two, 16 to 256: on an H200 the fastest of 16-256 at the toy's and Wan2.1-1.3B's
            sizes and with sketches at Wan2.1-14B's, 4 % behind 64 for masses only there); a
            key block is read once per tile of ``block_p`` probes.
    """
    b, h, mq, d = qhat.shape
    n = k.shape[2]
    r = 16 if sketch is None else sketch.shape[1]
    if k.stride(-1) != 1 or qhat.stride(-1) != 1:
        raise ValueError("probe_stats needs probes and keys with unit stride on D")
    if d & (d - 1) or block_k & (block_k - 1) or r & (r - 1):
        raise ValueError(f"probe_stats needs power-of-two D, block_k, r, got {d}, {block_k}, {r}")
    if min(d, block_k, r) < 16:
        raise ValueError(f"probe_stats needs D, block_k, r >= 16, got {d}, {block_k}, {r}")
    if block_p is None:
        block_p = max(16, min(256, triton.next_power_of_2(mq)))
    elif block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two >= 16, got {block_p}")
    mk = triton.cdiv(n, block_k)
    log_mass = torch.empty(b, h, mq, mk, device=k.device, dtype=torch.float32)
    with_keys = sketch is not None
    key_sketch = torch.empty(b, h, mq, mk, r, device=k.device) if with_keys else log_mass
    sketched = log_mass  # read only with keys, like key_sketch
    if with_keys:  # each key block sketched once, not once per tile of probes
        shift = k.mean(dim=2, dtype=torch.float32).contiguous()
        sketched = torch.empty(b, h, n, r, device=k.device, dtype=torch.float32)
        _sketch_kernel[(mk, b * h)](
            k, shift, sketch.contiguous(), sketched, k.stride(0), k.stride(1), k.stride(2), h, n,
            BLOCK_K=block_k, D=d, R=r, UPCAST=interpreting() and k.dtype == torch.bfloat16,
            num_warps=4,
        )  # fmt: skip
    _probe_kernel[(triton.cdiv(mq, block_p), mk, b * h)](
        qhat, k, sketched, log_mass, key_sketch,
        qhat.stride(0), qhat.stride(1), qhat.stride(2), k.stride(0), k.stride(1), k.stride(2),
        h, mq, mk, n, scale,
        BLOCK_P=block_p, BLOCK_K=block_k, D=d, R=r, WITH_KEYS=with_keys,
        UPCAST=interpreting() and k.dtype == torch.bfloat16, num_warps=8,
    )  # fmt: skip
    return log_mass, key_sketch if with_keys else None


@triton.jit
def _greedy_kernel(
    LogMass, KeySketch, Ids, Picks, Values, MK, NC, STEPS, kappa,
    BLOCK_C: tl.constexpr, R: tl.constexpr, CANDIDATES: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, R)
    valid = offs < NC
    if CANDIDATES:
        ids = tl.load(Ids + row * NC + offs, mask=valid, other=0).to(tl.int64)
    else:
        ids = offs.to(tl.int64)
    log_mass = tl.load(LogMass + row * MK + ids, mask=valid, other=float("-inf"))
    kap = tl.load(
        KeySketch + (row * MK + ids[:, None]) * R + offs_r[None, :], mask=valid[:, None], other=0.0
    )
    if CANDIDATES:  # normaliser, mean key and kappa term of the whole row, in chunks of it
        top = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), axis=0)
        for start in range(0, MK, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            chunk = tl.load(LogMass + row * MK + cols, mask=cols < MK, other=float("-inf"))
            top = tl.maximum(top, tl.max(chunk, axis=0))
        total = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)
        weighted = tl.zeros([R], dtype=tl.float32)
        for start in range(0, MK, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            chunk = tl.load(LogMass + row * MK + cols, mask=cols < MK, other=float("-inf"))
            e = tl.exp(chunk - top)
            sketches = tl.load(KeySketch + (row * MK + cols[:, None]) * R + offs_r[None, :],
                               mask=cols[:, None] < MK, other=0.0)  # fmt: skip
            total += tl.sum(e, axis=0)
            weighted += tl.sum(e[:, None] * sketches, axis=0)
        kap_mean = weighted / total
        rest = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)
        for start in range(0, MK, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            chunk = tl.load(LogMass + row * MK + cols, mask=cols < MK, other=float("-inf"))
            p_c = tl.exp(chunk - top) / total
            sketches = tl.load(KeySketch + (row * MK + cols[:, None]) * R + offs_r[None, :],
                               mask=cols[:, None] < MK, other=0.0)  # fmt: skip
            d_c = p_c[:, None] * (sketches - kap_mean[None, :])
            rest += tl.sum(tl.sum(d_c * d_c, axis=1), axis=0)
        p = tl.exp(log_mass - top) / total
        d = p[:, None] * (kap - kap_mean[None, :])
        norms = tl.sum(d * d, axis=1)
    else:
        top = tl.max(log_mass, axis=0)
        e = tl.exp(log_mass - top)
        total = tl.sum(e, axis=0)
        p = e / total
        kap_mean = tl.sum(p[:, None] * kap, axis=0)
        d = p[:, None] * (kap - kap_mean[None, :])
        norms = tl.sum(d * d, axis=1)
        rest = tl.sum(norms, axis=0)
    kept_sum = tl.zeros([R], dtype=tl.float32)
    zero = tl.sum(kept_sum, axis=0)  # a float32 scalar 0
    kept_norm = zero  # |kept_sum|^2
    mass = zero
    kept = offs < 0
    for step in range(STEPS):
        num = kept_norm + 2.0 * tl.sum(d * kept_sum[None, :], axis=1)
        num = num + norms + kappa * (rest - norms)
        den = (mass + p) * (mass + p)
        objective = tl.minimum(num / tl.maximum(den, TINY), BIG)
        objective = tl.where(kept | ~valid, float("inf"), objective)
        best = tl.argmin(objective, axis=0, tie_break_left=True)
        chosen = tl.load(Ids + row * NC + best).to(tl.int64) if CANDIDATES else best.to(tl.int64)
        # the chosen block's p and d again from memory: no more reductions over the key blocks
        # this step (37 % faster on an H200 than selecting them with three masked sums)
        p_best = tl.exp(tl.load(LogMass + row * MK + chosen) - top) / total
        d_best = p_best * (tl.load(KeySketch + (row * MK + chosen) * R + offs_r) - kap_mean)
        norm_best = tl.sum(d_best * d_best, axis=0)
        num_best = kept_norm + 2.0 * tl.sum(d_best * kept_sum, axis=0) + norm_best
        num_best = num_best + kappa * (rest - norm_best)
        value = num_best / tl.maximum((mass + p_best) * (mass + p_best), TINY)
        tl.store(Picks + row * STEPS + step, chosen.to(tl.int32))
        tl.store(Values + row * STEPS + step, tl.minimum(value, BIG))
        kept_sum += d_best
        kept_norm = tl.sum(kept_sum * kept_sum, axis=0)
        mass += p_best
        rest -= norm_best
        kept = kept | (offs == best)


def greedy_drop(
    log_mass: torch.Tensor,
    key_sketch: torch.Tensor,
    steps: int,
    kappa: float,
    candidates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy picks (B, H, Mq, steps) int64 and the objective after each step (float32).

    Args:
        log_mass: (B, H, Mq, Mk) and key_sketch: (B, H, Mq, Mk, r) float32 from
            :func:`probe_stats` (r a power of two).
        steps: in [1, C].
        candidates: (B, H, Mq, C) key-block ids, ascending per row, that the greedy may pick
            (default: all Mk); the masses, the mean key and the kappa term still cover the
            whole row. The row a program holds is then C x r, read once with Mk x r twice more.
    """
    b, h, mq, mk = log_mass.shape
    r = key_sketch.shape[-1]
    nc = mk if candidates is None else candidates.shape[-1]
    if r & (r - 1) or not 1 <= steps <= nc:
        raise ValueError(f"greedy_drop needs a power-of-two r and steps in [1, {nc}]")
    picks = torch.empty(b, h, mq, steps, device=log_mass.device, dtype=torch.int32)
    values = torch.empty(b, h, mq, steps, device=log_mass.device, dtype=torch.float32)
    ids = picks if candidates is None else candidates.to(torch.int32).contiguous()
    block_c = triton.next_power_of_2(nc)
    _greedy_kernel[(b * h * mq,)](
        log_mass.float().contiguous(), key_sketch.float().contiguous(), ids, picks, values,
        mk, nc, steps, float(kappa),
        BLOCK_C=block_c, R=r, CANDIDATES=candidates is not None, CHUNK=64,
        num_warps=4 if block_c * r < 8192 else 8,
    )  # fmt: skip
    return picks.long(), values

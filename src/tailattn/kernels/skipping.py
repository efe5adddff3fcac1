r"""In-loop skipping with the tail inside: ``blasst`` and ``recall`` as one Triton kernel (forward).

One program owns a query tile of ``BLOCK_M`` (= block_q) rows of one (batch, head) and walks
every key tile of ``BLOCK_N`` (= block_k) keys once, with the online softmax of
:mod:`tailattn.kernels.attention` in the exp2 domain (t = s log2(e) q.k, float32 accumulation).
Per row it keeps the running max m, the kept mass l and acc, all in the scale 2^m. Decisions are
per (query tile, key tile) and made for all rows at once: a tile is skipped only when every
valid row (rows past Nq ignored) agrees. Each tile's fate is written to an int8 map:
0 skipped before its QK, 1 skipped after its QK (no V load, no P.V), 2 computed.

* ``blasst(lam)``: tiles in memory order, the first never skipped; QK always computed; skip
  (no exp, no V load, no P.V, m, l, acc untouched) when ``rowmax(t) < m + log2(lam)`` on
  every valid row.
* ``recall(r)``: tiles in the per-query-tile order ``Order`` (descending pooled score
  s qbar_m . kbar_j + log n_j, computed by the wrapper). Per row also sigma, a bound on the
  skipped mass in the scale of m (rescaled with l when m moves). With R tiles not yet visited
  (this one included) and c = (1 - r) / r, the share of tile j is

      b_i = (1 - SKIP_SAFETY) (c l_i - sigma_i) / R,                                     (S1)

  and every tile but the first visited is tested twice:

  1. before its QK (no K load): ``B_ij = n_j 2^{s'(q_i . kbar_j + |q_i| rad_j) - m_i}`` bounds
     its mass (Cauchy-Schwarz, q.k <= q.kbar + |q| |k - kbar|; s' = s log2 e); skip when
     B_ij < b_i on every valid row, sigma_i += B_ij;                               (S2)
  2. after its QK, with m' = max(m, rowmax t): the exact mass in the scale of m is
     ``E_ij = sum_k 2^{t_ik - m'_i} 2^{m'_i - m_i}``; skip the V load and P.V when E_ij < b_i
     on every valid row, sigma_i += E_ij;                                          (S3)
  3. otherwise fold the tile in (l, acc, sigma rescaled by 2^{m - m'}).

  Every skip keeps sigma < c l, and l only grows, so the recall of every query row is at least
  r (proof: docs/skipping.md). The wrapper returns sigma / l per row.

Tails (the skipped tiles of a query tile are its dropped key blocks):

* ``DROP``: nothing.
* ``UTA``: the kept tiles' key and value sums are gathered in the loop; at the end one token per
  row, logit s q.kbar_D + log N_d with kbar_D = (K_total - sum_kept K_sum_j) / N_d and value
  vbar_D likewise (Eq. 10-13), merged by log-sum-exp.
* ``BLOCKS``: a skipped tile j becomes one token (s q.kbar_j + log n_j, vbar_j) when it is
  skipped. Its mass goes to a separate tail mass tm (same scale as l) so that l, the budget of
  the recall test and the blasst max stay about exact keys; the denominator is l + tm. The token
  never overflows the scale: its mass is at most the tile's (Jensen: n e^{mean z} <= sum e^z),
  which fits the budget (recall) or is below n_j lam (blasst).

Per call, before the kernel (one read of K and V): kbar_j and rad_j (:func:`_key_tile_stats`),
the tiles' key and value sums or means (:func:`tailattn.kernels.pooling.block_sums`), all in
float32, and for ``recall`` the visiting order (an argsort of the pooled logits). In the loop,
q_i . kbar_j of the recall bound and of the UTA token runs on the tensor cores
(:func:`_row_dot`), with no float32 copy of q kept live; a BLOCKS token's is a float32 sum.

Output: O = acc / (l + tm) in the input dtype, lse = (m + log2(l + tm)) ln 2 in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_fraction
from ..contract import FATE_COMPUTED, FATE_NO_PV, FATE_UNSEEN, SKIP_SAFETY, KernelTail
from ..layout import BlockLayout, block_sizes
from .attention import LOG2E, TAIL_BLOCKS, TAIL_CODES, TAIL_UTA, _dot
from .pooling import block_means, block_sums
from .runtime import interpreter_problem, interpreting

RULE_BLASST: tl.constexpr = tl.constexpr(0)
RULE_RECALL: tl.constexpr = tl.constexpr(1)


_UNSEEN: tl.constexpr = tl.constexpr(FATE_UNSEEN)
_NO_PV: tl.constexpr = tl.constexpr(FATE_NO_PV)
_COMPUTED: tl.constexpr = tl.constexpr(FATE_COMPUTED)


SKIP_BLOCK_SIZES = (64, 128)
SKIP_HEAD_DIMS = (16, 32, 64, 128)
SKIP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------- kernel


@triton.jit
def _everyone(wish, row_ok):
    """True when every valid row wishes (rows past Nq are ignored)."""
    return tl.min((wish | (row_ok == 0)).to(tl.int32), axis=0) == 1


@triton.jit
def _row_dot(q, x, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """q_i . x for every row of q (M, D), x (D,) float32, on the tensor cores and without a
    float32 copy of q: x is split into q's dtype as hi + lo (|x - hi - lo| <= 2^-16 |x| for
    bfloat16, exact for float32) in columns 0 and 1 of a (D, 16) operand, the rest zero."""
    cols = tl.arange(0, 16)[None, :]
    hi = x.to(q.dtype)
    lo = (x - hi.to(tl.float32)).to(q.dtype)
    operand = tl.where(cols == 0, hi[:, None], tl.where(cols == 1, lo[:, None], 0.0))
    dots = _dot(
        q, operand.to(q.dtype), tl.zeros([BLOCK_M, 16], dtype=tl.float32), PRECISION, UPCAST
    )
    return tl.sum(dots, axis=1)


@triton.jit
def _pooled_token(
    q, m_i, tm_i, acc, kbar_row, vbar_row, n_j, offs_d, offs_dv, scale_log2,
):  # fmt: skip
    """Fold the token (s q.kbar_j + log n_j, vbar_j) of a skipped tile into the tail mass tm
    and acc, in the scale of m (``BLOCKS``).

    q.kbar_j is a float32 multiply-and-sum, not :func:`_row_dot`: inside the skip branch of
    :func:`_qk_tile` the tensor-core form came out wrong for half-precision inputs at
    ``num_warps=4`` (Triton 3.6 on an H200: relative error 0.21 against the float64 reference,
    2e-3 at ``num_warps=8``); the test of every launch config guards it."""
    kbar = tl.load(kbar_row + offs_d)
    logit = tl.sum(q.to(tl.float32) * kbar[None, :], axis=1) * scale_log2
    p = tl.math.exp2(logit + tl.math.log2(n_j.to(tl.float32)) - m_i)
    vbar = tl.load(vbar_row + offs_dv)
    return tm_i + p, acc + p[:, None] * vbar[None, :]


@triton.jit
def _qk_tile(
    q, k_tile, v_tile, ksum_row, vsum_row, kbar_row, vbar_row, fate, skn, svn,
    i, start, n_j, N_K, share, log2_lam, scale_log2,
    m_i, l_i, tm_i, sigma, acc, k_kept, v_kept, n_kept, offs_n, offs_d, offs_dv, row_ok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RULE: tl.constexpr, TAIL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """A tile whose QK runs: the after-QK test ((S3) or blasst's), then skip or fold it in.

    Returns the running state (m, l, tm, sigma, acc, kept key sum, kept value sum, kept count).
    """
    cols = start + offs_n
    k = tl.load(
        k_tile + cols[None, :].to(tl.int64) * skn + offs_d[:, None],
        mask=cols[None, :] < N_K,
        other=0.0,
    )
    s = _dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
    s = s * scale_log2
    if start + BLOCK_N > N_K:  # only the ragged last tile pays for the mask
        s = tl.where(cols[None, :] < N_K, s, float("-inf"))
    tile_max = tl.max(s, axis=1)
    m_new = tl.maximum(m_i, tile_max)
    if RULE == RULE_RECALL:
        p = tl.math.exp2(s - m_new[:, None])
        p_sum = tl.sum(p, axis=1)
        mass = p_sum * tl.math.exp2(m_new - m_i)  # the tile's exact mass in the scale of m
        skip = (i > 0) & _everyone(mass < share, row_ok)
    else:
        skip = (i > 0) & _everyone(tile_max < m_i + log2_lam, row_ok)
    if skip:
        if RULE == RULE_RECALL:
            sigma += mass
        if TAIL == TAIL_BLOCKS:
            tm_i, acc = _pooled_token(
                q, m_i, tm_i, acc, kbar_row, vbar_row, n_j, offs_d, offs_dv, scale_log2
            )  # fmt: skip
        tl.store(fate, _NO_PV)
    else:
        if RULE == RULE_BLASST:  # the exponentials only for the tiles blasst keeps
            p = tl.math.exp2(s - m_new[:, None])
            p_sum = tl.sum(p, axis=1)
        v = tl.load(
            v_tile + cols[:, None].to(tl.int64) * svn + offs_dv[None, :],
            mask=cols[:, None] < N_K,
            other=0.0,
        )
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + p_sum
        tm_i = tm_i * alpha
        sigma = sigma * alpha
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
        if TAIL == TAIL_UTA:
            k_kept += tl.load(ksum_row + offs_d)
            v_kept += tl.load(vsum_row + offs_dv)
            n_kept += n_j
        tl.store(fate, _COMPUTED)
    return m_i, l_i, tm_i, sigma, acc, k_kept, v_kept, n_kept


@triton.jit
def _skipping_fwd(
    Q, K, V, Out, Lse, Fate, Ratio, Order,
    KBar, Rad, KSum, VSum, KTot, VTot, VBar,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, N_Q, N_K, M_Q, M_K, scale_log2, log2_lam, recall_coef, safety,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    RULE: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)

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
    q_norm = tl.sqrt(tl.sum(q.to(tl.float32) * q.to(tl.float32), axis=1))
    k_tile = K + b * skb + h * skh
    v_tile = V + b * svb + h * svh
    tile_row = (bh64 * M_Q + pid_m) * M_K  # this query tile's row of Order and Fate

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # kept (exact) mass
    tm_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # pooled-token mass (BLOCKS)
    sigma = tl.zeros([BLOCK_M], dtype=tl.float32)  # bound on the skipped mass (recall)
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)
    k_kept = tl.zeros([HEAD_D], dtype=tl.float32)
    v_kept = tl.zeros([HEAD_DV], dtype=tl.float32)
    n_kept = tl.zeros([], dtype=tl.int32)

    for i in range(0, M_K):
        j = tl.load(Order + tile_row + i) if RULE == RULE_RECALL else i
        start = j * BLOCK_N
        n_j = tl.minimum(BLOCK_N, N_K - start)
        tile = bh64 * M_K + j  # row of the per-tile statistics
        kbar_row = KBar + tile * HEAD_D
        vbar_row = VBar + tile * HEAD_DV
        share = (recall_coef * l_i - sigma) / (M_K - i).to(tl.float32) * (1.0 - safety)  # (S1)
        if RULE == RULE_RECALL:
            # (S2): the a priori test, before any K load
            q_kbar = _row_dot(q, tl.load(kbar_row + offs_d), BLOCK_M, PRECISION, UPCAST)
            upper = (q_kbar + q_norm * tl.load(Rad + tile)) * scale_log2
            bound = n_j.to(tl.float32) * tl.math.exp2(upper - m_i)
            if (i > 0) & _everyone(bound < share, row_ok):
                sigma += bound
                if TAIL == TAIL_BLOCKS:
                    tm_i, acc = _pooled_token(
                        q, m_i, tm_i, acc, kbar_row, vbar_row, n_j, offs_d, offs_dv, scale_log2
                    )  # fmt: skip
                tl.store(Fate + tile_row + j, _UNSEEN)
            else:
                m_i, l_i, tm_i, sigma, acc, k_kept, v_kept, n_kept = _qk_tile(
                    q, k_tile, v_tile, KSum + tile * HEAD_D, VSum + tile * HEAD_DV, kbar_row,
                    vbar_row, Fate + tile_row + j, skn, svn, i, start, n_j, N_K, share, log2_lam,
                    scale_log2, m_i, l_i, tm_i, sigma, acc, k_kept, v_kept, n_kept, offs_n,
                    offs_d, offs_dv, row_ok, BLOCK_M, BLOCK_N, RULE, TAIL, PRECISION, UPCAST,
                )  # fmt: skip
        else:
            m_i, l_i, tm_i, sigma, acc, k_kept, v_kept, n_kept = _qk_tile(
                q, k_tile, v_tile, KSum + tile * HEAD_D, VSum + tile * HEAD_DV, kbar_row,
                vbar_row, Fate + tile_row + j, skn, svn, i, start, n_j, N_K, share, log2_lam,
                scale_log2, m_i, l_i, tm_i, sigma, acc, k_kept, v_kept, n_kept, offs_n,
                offs_d, offs_dv, row_ok, BLOCK_M, BLOCK_N, RULE, TAIL, PRECISION, UPCAST,
            )  # fmt: skip

    if RULE == RULE_RECALL:
        tl.store(Ratio + bh64 * N_Q + offs_m, sigma / l_i, mask=row_ok)

    # UTA: one token from the mean dropped key and value (Eq. 10-13), merged in registers
    den = l_i + tm_i
    if TAIL == TAIL_UTA:
        n_d = N_K - n_kept
        if n_d > 0:
            k_tail = (tl.load(KTot + bh64 * HEAD_D + offs_d) - k_kept) / n_d
            v_tail = (tl.load(VTot + bh64 * HEAD_DV + offs_dv) - v_kept) / n_d
            t = _row_dot(q, k_tail, BLOCK_M, PRECISION, UPCAST) * scale_log2
            t = t + tl.math.log2(n_d.to(tl.float32))
            m_new = tl.maximum(m_i, t)
            alpha = tl.math.exp2(m_i - m_new)
            p_tail = tl.math.exp2(t - m_new)
            den = den * alpha + p_tail
            acc = acc * alpha[:, None] + p_tail[:, None] * v_tail[None, :]
            m_i = m_new

    out = acc / den[:, None]
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None].to(tl.int64) * son + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = (m_i + tl.math.log2(den)) * 0.6931471805599453
    tl.store(Lse + bh64 * N_Q + offs_m, lse, mask=row_ok)


def launch_configs() -> list[dict[str, int]]:
    """The launch options autotuning chooses from. BLOCK_M and BLOCK_N are not among them:
    they are the tile sizes the decisions are made for (block_q, block_k), and a tile's rowmax
    and mass are needed before its P.V."""
    return [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (2, 3)]


_skipping_fwd_tuned = triton.autotune(
    configs=[triton.Config({}, **options) for options in launch_configs()],
    key=["HEAD_D", "HEAD_DV", "RULE", "TAIL", "BLOCK_M", "BLOCK_N", "PRECISION"],
)(_skipping_fwd)

INTERPRETER_CONFIG = {"num_warps": 4, "num_stages": 1}
"""The fixed config in the Triton interpreter (launch options have no effect there)."""


@triton.jit
def _key_tile_stats(
    K, KSum, Rad, skb, skh, skn, H, N_K, M_K,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Sum of the keys of tile j and its radius max_k |k - kbar_j| (kbar_j = sum / n_j)."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    base = K + (bh // H).to(tl.int64) * skb + (bh % H).to(tl.int64) * skh
    offs_d = tl.arange(0, HEAD_D)
    total = tl.zeros([HEAD_D], dtype=tl.float32)
    for c in tl.static_range(0, BLOCK_N, CHUNK):
        rows = j * BLOCK_N + c + tl.arange(0, CHUNK)
        ptrs = base + rows[:, None].to(tl.int64) * skn + offs_d[None, :]
        total += tl.sum(tl.load(ptrs, mask=rows[:, None] < N_K, other=0.0).to(tl.float32), 0)
    mean = total / tl.minimum(BLOCK_N, N_K - j * BLOCK_N).to(tl.float32)
    far = tl.zeros([], dtype=tl.float32)
    for c in tl.static_range(0, BLOCK_N, CHUNK):  # second read of the tile, from L2
        rows = j * BLOCK_N + c + tl.arange(0, CHUNK)
        ptrs = base + rows[:, None].to(tl.int64) * skn + offs_d[None, :]
        dev = tl.load(ptrs, mask=rows[:, None] < N_K, other=0.0).to(tl.float32) - mean[None, :]
        dist2 = tl.where(rows < N_K, tl.sum(dev * dev, axis=1), 0.0)
        far = tl.maximum(far, tl.max(dist2, axis=0))
    out = bh.to(tl.int64) * M_K + j
    tl.store(KSum + out * HEAD_D + offs_d, total)
    tl.store(Rad + out, tl.sqrt(far))


# ---------------------------------------------------------------------------- wrapper


@dataclass(frozen=True)
class BlasstRule:
    """BLASST: skip a tile's exp and P.V when its max logit is below the running max + log lam."""

    lam: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)):
            raise TypeError(f"lam must be a number in (0, 1), got {self.lam!r}")
        if not 0.0 < self.lam < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {self.lam}")


@dataclass(frozen=True)
class RecallRule:
    """Fixed recall (ours): skip tiles while the recall of every query row stays >= ``recall``."""

    recall: float = 0.95

    def __post_init__(self) -> None:
        check_fraction(self.recall, "recall")


SkipRule = BlasstRule | RecallRule


@dataclass(frozen=True)
class SkipResult:
    """What :func:`skipping_attention` computed.

    Attributes:
        out: (B, H, Nq, Dv) in q's dtype.
        lse: (B, H, Nq) float32, natural log.
        fate: (B, H, Mq, Mk) int8: 0 skipped before QK, 1 skipped after QK, 2 computed.
        skipped_ratio: (B, H, Nq) float32 sigma / l for ``recall`` (the guaranteed recall
            bound is 1 / (1 + ratio)), None for ``blasst``.
        n_k, block_q, block_k: the key count and the tile sizes the fates refer to.
    """

    out: torch.Tensor
    lse: torch.Tensor
    fate: torch.Tensor
    skipped_ratio: torch.Tensor | None
    n_k: int
    block_q: int
    block_k: int

    def layout(self) -> BlockLayout:
        """The computed tiles (fate 2) as a layout, without a device sync (every query tile
        computes its first visited tile, so no row is empty)."""
        n_q = self.out.shape[2]
        kept = self.fate == FATE_COMPUTED
        return BlockLayout.from_dense(kept, n_q, self.n_k, self.block_q, self.block_k, check=False)

    def _key_fraction(self, tiles: torch.Tensor) -> torch.Tensor:
        sizes = block_sizes(self.n_k, self.block_k, tiles.device).to(torch.float32)
        return (tiles.to(torch.float32) @ sizes) / self.n_k

    @property
    def density(self) -> torch.Tensor:
        """(B, H, Mq) float32: fraction of the keys whose P.V ran, per query tile."""
        return self._key_fraction(self.fate == FATE_COMPUTED)

    @property
    def qk_density(self) -> torch.Tensor:
        """(B, H, Mq) float32: fraction of the keys whose QK ran, per query tile."""
        return self._key_fraction(self.fate != FATE_UNSEEN)


def _kernel_tail(tail: object) -> object:
    """``tail`` as a :class:`KernelTail` when it names one (``"uta"`` too), else unchanged."""
    try:
        return KernelTail(tail)
    except ValueError:
        return tail


def unsupported_reason(
    q: torch.Tensor, v: torch.Tensor, tail: object, block_q: int, block_k: int
) -> str | None:
    """Why the skipping kernel cannot run these inputs (None when it can), so that a dispatcher
    can fall back to the reference loop (:class:`tailattn.select.dynamic.TileLoop`)."""
    problem = interpreter_problem()
    if problem is not None:
        return problem
    if not isinstance(_kernel_tail(tail), KernelTail):
        return f"tail {tail!r} (the kernel runs {', '.join(t.value for t in KernelTail)})"
    if q.device.type != "cuda" and not interpreting():
        return f"{q.device.type} tensors (the kernel needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    if q.dtype not in SKIP_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    for name, dim in (("head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
        if dim not in SKIP_HEAD_DIMS:
            return f"{name} {dim} (the kernel takes {SKIP_HEAD_DIMS})"
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size not in SKIP_BLOCK_SIZES:
            return f"{name}={size} (the kernel takes {SKIP_BLOCK_SIZES})"
    return None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rule: object) -> None:
    if not isinstance(rule, (BlasstRule, RecallRule)):
        raise TypeError(f"rule must be a BlasstRule or a RecallRule, got {rule!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"{name} must be a (B, H, N, D) tensor, got {getattr(x, 'shape', x)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) do not match: "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if min(q.shape[2], k.shape[2]) < 1:
        raise ValueError("q and k need at least one token")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share one dtype and one device")


def _key_stats(
    k: torch.Tensor, v: torch.Tensor, rule: SkipRule, tail: KernelTail, block_k: int
) -> dict[str, torch.Tensor]:
    """Per key tile, what the rule and the tail read: mean key and radius (recall), key and
    value sums and totals (UTA), mean key and value (BLOCKS); float32, contiguous."""
    b, h, n_k, d = k.shape
    counts = block_sizes(n_k, block_k, k.device).to(torch.float32).unsqueeze(-1)
    stats: dict[str, torch.Tensor] = {}
    if isinstance(rule, RecallRule):
        m_k = triton.cdiv(n_k, block_k)
        ksum = torch.empty(b, h, m_k, d, device=k.device, dtype=torch.float32)
        stats["rad"] = torch.empty(b, h, m_k, device=k.device, dtype=torch.float32)
        _key_tile_stats[(m_k, b * h)](
            k, ksum, stats["rad"], k.stride(0), k.stride(1), k.stride(2), h, n_k, m_k,
            BLOCK_N=block_k, HEAD_D=d, CHUNK=32,
        )  # fmt: skip
    elif tail != KernelTail.DROP:
        ksum = block_sums(k, block_k)
    if isinstance(rule, RecallRule) or tail == KernelTail.BLOCKS:
        stats["kbar"] = ksum / counts
    if tail == KernelTail.UTA:
        vsum = block_sums(v, block_k)
        stats |= {"ksum": ksum, "vsum": vsum, "ktot": ksum.sum(2), "vtot": vsum.sum(2)}
    if tail == KernelTail.BLOCKS:
        stats["vbar"] = block_sums(v, block_k) / counts
    return stats


def _visit_order(
    q: torch.Tensor, kbar: torch.Tensor, n_k: int, scale: float, block_q: int, block_k: int
) -> torch.Tensor:
    """Key tiles by descending pooled score s qbar_m . kbar_j + log n_j, (B, H, Mq, Mk) int32
    (the reference loop's order, :meth:`tailattn.select.Recall.order`, from the same means)."""
    qbar, _ = block_means(q, block_q)
    log_n = torch.log(block_sizes(n_k, block_k, q.device).to(torch.float32))
    scores = scale * qbar @ kbar.mT + log_n
    return scores.argsort(dim=-1, descending=True, stable=True).to(torch.int32).contiguous()


def skipping_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rule: SkipRule,
    *,
    tail: KernelTail | str = KernelTail.DROP,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    config: dict[str, int] | None = None,
) -> SkipResult:
    """Attention that skips key tiles inside the loop, with the tail fused in (Triton).

    Never synchronizes with the device (no data-dependent shapes), so it can run under
    ``torch.cuda.set_sync_debug_mode("error")`` and in CUDA graphs once autotuned.

    Args:
        q: (B, H, Nq, D), any strides with a unit stride on D (a (B, N, H, D) tensor viewed as
            bhnd runs without a copy); k: (B, H, Nk, D); v: (B, H, Nk, Dv).
        rule: :class:`BlasstRule` (``lam`` in (0, 1)) or :class:`RecallRule` (``recall`` in
            (0, 1]).
        tail: what the skipped tiles become (``KernelTail`` or its value).
        scale: logit scale, default 1/sqrt(D).
        block_q, block_k: the tile sizes of the decisions, 64 or 128.
        config: fixed launch options (``num_warps``, ``num_stages``) instead of autotuning;
            the interpreter uses :data:`INTERPRETER_CONFIG`.

    Returns:
        A :class:`SkipResult`.
    """
    _check_inputs(q, k, v, rule)
    reason = unsupported_reason(q, v, tail, block_q, block_k)
    if reason is not None:
        raise ValueError(f"the skipping kernel cannot run {reason}")
    tail = KernelTail(tail)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    b, h, n_q, _ = q.shape
    n_k, dv = k.shape[2], v.shape[-1]
    m_q, m_k = triton.cdiv(n_q, block_q), triton.cdiv(n_k, block_k)
    recall = isinstance(rule, RecallRule)

    out = torch.empty(b, h, n_q, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    fate = torch.empty(b, h, m_q, m_k, device=q.device, dtype=torch.int8)
    ratio = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32) if recall else None
    dummy = torch.zeros(1, device=q.device, dtype=torch.float32)
    stats = _key_stats(k, v, rule, tail, block_k)
    if recall:
        order = _visit_order(q, stats["kbar"], n_k, s, block_q, block_k)
    else:
        order = dummy.to(torch.int32)
    tensors = [stats.get(n, dummy) for n in ("kbar", "rad", "ksum", "vsum", "ktot", "vtot")]
    args = (q, k, v, out, lse, fate, dummy if ratio is None else ratio, order, *tensors)
    args = (*args, stats.get("vbar", dummy))
    args = (*args, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    args = (*args, h, n_q, n_k, m_q, m_k, s * LOG2E)
    log2_lam = math.log2(rule.lam) if isinstance(rule, BlasstRule) else 0.0
    recall_coef = (1.0 - rule.recall) / rule.recall if recall else 0.0
    args = (*args, log2_lam, recall_coef, SKIP_SAFETY)
    meta = dict(
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        HEAD_D=q.shape[-1],
        HEAD_DV=dv,
        RULE=int(recall),
        TAIL=TAIL_CODES[tail.value],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
    )
    if interpreting() and config is None:
        config = INTERPRETER_CONFIG
    grid = (m_q, b * h)
    if config is None:
        _skipping_fwd_tuned[grid](*args, **meta)
    else:
        _skipping_fwd[grid](*args, **meta, **config)
    return SkipResult(out, lse, fate, ratio, n_k, block_q, block_k)

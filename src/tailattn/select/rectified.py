r"""Rectified SpaAttn: sparse attention rescaled and compensated against an implicit
full-attention reference computed from pooled blocks (docs/methods.md section 6).

Tokens are optionally reordered along a 3D curve (``curve``, default row-major) with the
``text_tokens`` last, then cut into query blocks m and key blocks n with means qbar, kbar, vbar:

1. Implicit reference: ``P_mn = softmax_n(s qbar_m . kbar_n + log n_n)`` (each block stands for
   its n_n tokens; = n_n p_mn / sum n' p_mn'). Key blocks holding text tokens enter unpooled:
   their logit is ``log sum_{i in n} exp(s qbar_m . k_i)``.
2. Critical set S_m: P_m in descending order, the shortest prefix whose mass reaches
   ``p_remain`` (0.3) plus one block, at least ``k_min = ceil((1 - drop_rate) * Mk)`` blocks
   (``drop_rate`` 0.75 for Wan2.1, 0.8 for HunyuanVideo); plus, always, the key blocks holding
   a grid neighbour (|dt| + |dh| + |dw| <= 1) of a token of block m, and the text blocks.
3. Gain test (GAPR, unscaled): ``g_mn = |qbar_m . kbar_n|``,
   ``e_mn = |dq_m . kbar_n| + |qbar_m . dk_n|`` with ``dq_m = mean_{i in m} |q_i - qbar_m|``
   (element-wise, likewise dk_n); ``G_m = {n not in S_m : g_mn <= e_mn}``: blocks whose pooled
   estimate is unreliable.
4. ``R_m = sum_{n in S_m or G_m} P_mn``; 5. ``C_m = sum_{n not in S_m or G_m} P_mn vbar_n``;
6. ``O_i = R_m O_sparse_i + C_m`` for every query i of block m, where O_sparse is exact
   attention normalized over the key blocks of S_m. The reported lse is that of the sparse
   part minus log R_m (the total mass the output implies).

With ``drop_rate=0`` every block is critical: R = 1, C = 0 and the output is full attention.
Rectified carries its own compensation, so it takes no tail (``rectified`` = ``rectified+drop``).
Info entries: ``density`` (kept key blocks, in tokens), per-query ``recall`` (exact mass of S),
``rescale`` (mean R) and ``gain_blocks`` (mean share of key blocks in G).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import accumulation_dtype, check_grid
from ..contract import KernelTail, Result
from ..layout import BlockLayout, block_sizes, num_blocks
from ..methods import registry
from ..permute import permute_tokens, unpermute_tokens
from ..reference.blocks import block_attention
from ..tails.block import BlockDrop, BlockTail, to_blocks
from .blocks import block_budget, check_block_size, pool_blocks, top_mass_counts, triton_pooling
from .curves import check_curve, grid_order


@functools.lru_cache(maxsize=32)
def neighbour_blocks(
    grid: tuple[int, int, int],
    curve: str,
    text_tokens: int,
    block_q: int,
    block_k: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(Mq, Mk) bool on ``device``: key block n holds a grid neighbour (or the same token) of a
    token of query block m, in the curve order; text tokens have no neighbours. Cached per
    device (copied once); do not modify."""
    if torch.device(device).type != "cpu":
        return neighbour_blocks(grid, curve, text_tokens, block_q, block_k).to(device)
    t, h, w = grid
    n_video = t * h * w
    n = n_video + text_tokens
    position = grid_order(grid, curve, text_tokens)[1]
    ids = torch.arange(n_video)
    coords = torch.stack([ids // (h * w), ids // w % h, ids % w], dim=1)
    sizes = torch.tensor([t, h, w])
    strides = torch.tensor([h * w, w, 1])
    mask = torch.zeros(num_blocks(n, block_q), num_blocks(n, block_k), dtype=torch.bool)
    mask[position[ids] // block_q, position[ids] // block_k] = True
    for axis in range(3):
        for step in (-1, 1):
            other = coords[:, axis] + step
            inside = (other >= 0) & (other < sizes[axis])
            src = ids[inside]
            dst = src + step * strides[axis]
            mask[position[src] // block_q, position[dst] // block_k] = True
    return mask


def _mean_abs_deviation(x: torch.Tensor, means: torch.Tensor, block: int) -> torch.Tensor:
    """``mean_{i in block} |x_i - xbar|`` element-wise, (B, H, M, D)."""
    n = x.shape[2]
    centred = (to_blocks(x, block) - means.unsqueeze(3)).abs()
    valid = (torch.arange(centred.shape[2] * block, device=x.device) < n).view(-1, block, 1)
    sizes = block_sizes(n, block, x.device).to(x.dtype).view(-1, 1)
    return (centred * valid).sum(dim=3) / sizes


def block_stats(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block means xbar and element-wise spreads ``mean_{i in block} |x_i - xbar|``, (B, H, M, D)
    in the accumulation dtype: one Triton pass on CUDA (:func:`tailattn.kernels.block_spread`),
    PyTorch elsewhere."""
    if triton_pooling(x, block):
        from ..kernels import block_spread

        return block_spread(x, block)
    xa = x.to(accumulation_dtype(x.dtype))
    means = pool_blocks(xa, block)
    return means, _mean_abs_deviation(xa, means, block)


@dataclass(frozen=True)
class RectifiedPlan:
    """What Rectified computes before attending, per query block in the curve order.

    ``layout``: the critical blocks S (with the curve permutation); ``rescale``: R
    (B, H, Mq); ``compensation``: C (B, H, Mq, Dv); ``unreliable``: G (B, H, Mq, Mk) bool;
    ``mass``: the reference P (B, H, Mq, Mk).
    """

    layout: BlockLayout
    rescale: torch.Tensor
    compensation: torch.Tensor
    unreliable: torch.Tensor
    mass: torch.Tensor


@registry.selection("rectified", granularity="fused", summary="pooled reference: R*O_sparse + C")
@dataclass(frozen=True)
class Rectified:
    """Rectified SpaAttn: critical blocks rescaled by R, the rest compensated by C."""

    drop_rate: float = 0.75
    p_remain: float = 0.3
    curve: str = "none"
    text_tokens: int = 0
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self) -> None:
        for name, closed in (("drop_rate", False), ("p_remain", True)):
            value = getattr(self, name)
            interval = "[0, 1]" if closed else "[0, 1)"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
            if not (0.0 <= float(value) < 1.0 or (closed and float(value) == 1.0)):
                raise ValueError(f"{name} must be in {interval}, got {value}")
        check_curve(self.curve)
        if isinstance(self.text_tokens, bool) or not isinstance(self.text_tokens, int):
            raise ValueError(f"text_tokens must be an integer >= 0, got {self.text_tokens!r}")
        if self.text_tokens < 0:
            raise ValueError(f"text_tokens must be an integer >= 0, got {self.text_tokens!r}")
        check_block_size(self.block_q, "block_q")
        check_block_size(self.block_k, "block_k")

    def reference_mass(
        self, qbar: torch.Tensor, kbar: torch.Tensor, kp: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``P_mn`` (B, H, Mq, Mk): pooled key blocks, text blocks unpooled (step 1)."""
        n_k = kp.shape[2]
        counts = block_sizes(n_k, self.block_k, kp.device).to(qbar.dtype)
        logits = scale * qbar @ kbar.mT + torch.log(counts)
        first_text = (n_k - self.text_tokens) // self.block_k
        if self.text_tokens:
            for n in range(first_text, kbar.shape[2]):
                keys = kp[:, :, n * self.block_k : (n + 1) * self.block_k].to(qbar.dtype)
                logits[..., n] = torch.logsumexp(scale * qbar @ keys.mT, dim=-1)
        return torch.softmax(logits, dim=-1)

    def critical(self, mass: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """S_m as a bool (B, H, Mq, Mk) block mask (step 2)."""
        mk = mass.shape[-1]
        probs, ranked = mass.sort(dim=-1, descending=True, stable=True)
        counts = (top_mass_counts(probs, self.p_remain, 0) + 1).clamp(max=mk)
        counts = counts.clamp(min=block_budget(1.0 - self.drop_rate, mk))
        chosen = torch.arange(mk, device=mass.device) < counts.unsqueeze(-1)
        mask = torch.zeros_like(chosen).scatter_(-1, ranked, chosen)
        mask |= neighbour_blocks(
            grid, self.curve, self.text_tokens, self.block_q, self.block_k, mass.device
        )
        if self.text_tokens:
            mask[..., (grid[0] * grid[1] * grid[2]) // self.block_k :] = True
        return mask

    def check(
        self, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int] | None
    ) -> tuple[int, int, int]:
        """The grid, checked against these (B, H, N, D) inputs of a self-attention."""
        if grid is None:
            raise ValueError("rectified needs grid=(T, H, W), the latent video grid of the tokens")
        grid = check_grid(grid, k.shape[2], self.text_tokens)
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"rectified is a self-attention method: q has {q.shape[2]} tokens but k has "
                f"{k.shape[2]}"
            )
        return grid

    def plan(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        grid: tuple[int, int, int],
    ) -> RectifiedPlan:
        """Steps 1-5 on validated (B, H, N, D) inputs and a grid passed by :meth:`check`."""
        perm = self.permutation(grid, q.device)
        qp, kp, vp = (permute_tokens(x, perm) for x in (q, k, v))
        qbar, dq = block_stats(qp, self.block_q)
        kbar, dk = block_stats(kp, self.block_k)
        vbar = pool_blocks(vp, self.block_k)
        mass = self.reference_mass(qbar, kbar, kp, scale)
        critical = self.critical(mass, grid)
        gain = (qbar @ kbar.mT).abs()
        error = (dq @ kbar.mT).abs() + (qbar @ dk.mT).abs()
        unreliable = ~critical & (gain <= error)
        counted = critical | unreliable
        n = q.shape[2]
        # every row keeps >= ceil((1 - drop_rate) * Mk) >= 1 blocks: no check (and no sync) needed
        layout = BlockLayout.from_dense(
            critical, n, n, self.block_q, self.block_k, perm, perm, check=False
        )
        return RectifiedPlan(
            layout, (mass * counted).sum(dim=-1), (mass * ~counted) @ vbar, unreliable, mass
        )

    def permutation(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor | None:
        """The curve order of the tokens on ``device`` (``None`` for row-major: no copy)."""
        if self.curve == "none":
            return None
        return grid_order(grid, self.curve, self.text_tokens, device)[0]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tail: BlockTail,
        *,
        scale: float,
        grid: tuple[int, int, int] | None = None,
        state: Any = None,
        with_stats: bool = False,
        backend: str | None = None,
    ) -> Result:
        """Steps 1-6: the plan, the critical blocks exactly (the fused block-sparse kernel on
        CUDA, the reference executor elsewhere) and ``R O_sparse + C`` as one epilogue."""
        from ..execute import check_values, use_kernel

        if not isinstance(tail, BlockDrop):
            raise ValueError(
                "rectified takes no tail: its compensation C already stands for the dropped "
                "blocks; use 'rectified'"
            )
        grid = self.check(q, k, grid)
        plan = self.plan(q, k, v, scale, grid)
        layout, rescale, compensation = plan.layout, plan.rescale, plan.compensation
        stats: dict[str, torch.Tensor] = {}
        if use_kernel(backend, (q, k, v), tail, layout):
            from ..kernels import block_sparse_attention

            out, lse = block_sparse_attention(q, k, v, layout, KernelTail.DROP, scale)
        else:
            check_values(q, k, v)
            out, lse, stats = block_attention(
                q, k, v, layout, BlockDrop(), scale, with_stats=with_stats
            )
        block_of = torch.arange(q.shape[2], device=q.device) // self.block_q
        r_tok = unpermute_tokens(rescale[..., block_of], layout.q_perm)
        c_tok = unpermute_tokens(compensation[:, :, block_of], layout.q_perm)
        out = torch.addcmul(c_tok, r_tok.unsqueeze(-1), out.to(c_tok.dtype))
        lse = lse - torch.log(r_tok)
        if not with_stats:
            return Result(out, lse)
        info = {
            "density": layout.density(),
            "layout": layout,
            "rescale": float(rescale.mean()),
            "gain_blocks": float(plan.unreliable.to(rescale.dtype).mean()),
        }
        kept_stats = {name: stats[name] for name in ("density", "recall") if name in stats}
        return Result(out, lse, kept_stats, info)

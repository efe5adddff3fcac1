"""Block layouts: the sparsity of a block-sparse selection as one small frozen dataclass.

A :class:`BlockLayout` says, for every (batch, head, query block), which key blocks are computed
exactly. Tokens are split into blocks of ``block_q`` query and ``block_k`` key tokens in the
(optionally permuted) token order; the last block of each side may be ragged. Kept key blocks
are stored FlexAttention-style as padded CSR rows:

    kv_indices  int32 (B, H, Mq, Kmax)   kept key-block ids of each query block; the first
                                         kv_counts[b, h, m] entries are valid, the rest padding
    kv_counts   int32 (B, H, Mq)         number of kept key blocks, 1 <= count <= Mk

with Mq = ceil(Nq / block_q), Mk = ceil(Nk / block_k). An optional token permutation reorders
queries (``q_perm``) and keys/values (``kv_perm``) before blocking: position j of the permuted
sequence holds original token ``perm[..., j]``. Permutations are (N,) (shared by all heads) or
(B, H, N). Everything else (dense masks, FlexAttention block masks, density, token masks) is a
conversion method.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass

import torch

from .permute import invert_permutation


def num_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


def block_sizes(n: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Token count of each block, (ceil(n / block),) int64; the last one may be smaller."""
    starts = torch.arange(0, n, block, dtype=torch.int64, device=device)
    return (n - starts).clamp_(max=block)  # no host value written into a device tensor: no sync


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, M, block, D), zero-padded to M * block tokens."""
    b, h, n, d = x.shape
    m = num_blocks(n, block)
    if m * block == n:
        return x.view(b, h, m, block, d)
    padded = x.new_zeros(b, h, m * block, d)
    padded[:, :, :n] = x
    return padded.view(b, h, m, block, d)


def _check_perm(perm: torch.Tensor | None, name: str, n: int, bh: tuple[int, int]) -> None:
    if perm is None:
        return
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {getattr(perm, 'dtype', type(perm))}")
    if perm.shape not in ((n,), (*bh, n)):
        raise ValueError(f"{name} must have shape ({n},) or {(*bh, n)}, got {tuple(perm.shape)}")
    seen = torch.zeros(perm.shape, dtype=torch.bool, device=perm.device)
    if bool(((perm < 0) | (perm >= n)).any()):
        raise ValueError(f"{name} has entries outside [0, {n})")
    seen.scatter_(-1, perm, True)
    if not bool(seen.all()):
        raise ValueError(f"{name} is not a permutation: some tokens appear twice, others never")


@dataclass(frozen=True)
class BlockLayout:
    """Kept key blocks per (batch, head, query block); see the module docstring for the fields.

    The reference executor accepts any block size >= 1; the Triton kernels take 64 or 128.
    ``check=False`` skips validation (device syncs) for layouts correct by construction, such
    as a top-k selection's; everything else should leave it on.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    n_q: int
    n_k: int
    block_q: int = 128
    block_k: int = 128
    q_perm: torch.Tensor | None = None
    kv_perm: torch.Tensor | None = None
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        for name in ("n_q", "n_k", "block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        idx, cnt = self.kv_indices, self.kv_counts
        for name, t in (("kv_indices", idx), ("kv_counts", cnt)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
                raise TypeError(f"{name} must be an int32 tensor, got {getattr(t, 'dtype', t)}")
        if idx.ndim != 4 or cnt.shape != idx.shape[:3]:
            raise ValueError(
                f"kv_indices must be (B, H, Mq, Kmax) and kv_counts (B, H, Mq); got "
                f"{tuple(idx.shape)} and {tuple(cnt.shape)}"
            )
        if idx.device != cnt.device:
            raise ValueError("kv_indices and kv_counts must be on the same device")
        mq, mk = self.num_q_blocks, self.num_k_blocks
        if idx.shape[2] != mq:
            raise ValueError(
                f"kv_indices has {idx.shape[2]} query blocks but n_q={self.n_q} with "
                f"block_q={self.block_q} needs {mq}"
            )
        if idx.shape[3] < 1 or idx.shape[3] > mk:
            raise ValueError(f"kv_indices last axis must be in [1, {mk}], got {idx.shape[3]}")
        if not check:
            return
        if bool((cnt < 1).any()) or bool((cnt > idx.shape[3]).any()):
            raise ValueError(
                f"kv_counts must be in [1, {idx.shape[3]}]: every query block keeps at least one "
                f"key block (an empty query block has nothing to attend to)"
            )
        valid = self.valid_mask()
        if bool(((idx < 0) | (idx >= mk))[valid].any()):
            raise ValueError(f"kv_indices has key-block ids outside [0, {mk})")
        ordered = idx.masked_fill(~valid, -1).sort(dim=-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
            raise ValueError("kv_indices lists the same key block twice in a query block")
        _check_perm(self.q_perm, "q_perm", self.n_q, tuple(idx.shape[:2]))
        _check_perm(self.kv_perm, "kv_perm", self.n_k, tuple(idx.shape[:2]))

    # ------------------------------------------------------------------ shapes
    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.n_q, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return num_blocks(self.n_k, self.block_k)

    @property
    def batch_heads(self) -> tuple[int, int]:
        return tuple(self.kv_indices.shape[:2])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def q_block_sizes(self) -> torch.Tensor:
        return block_sizes(self.n_q, self.block_q, self.device)

    def k_block_sizes(self) -> torch.Tensor:
        return block_sizes(self.n_k, self.block_k, self.device)

    def valid_mask(self) -> torch.Tensor:
        """(B, H, Mq, Kmax) bool: which kv_indices entries are real (not padding)."""
        slots = torch.arange(self.kv_indices.shape[-1], device=self.device)
        return slots < self.kv_counts.unsqueeze(-1)

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        mask: torch.Tensor,
        n_q: int,
        n_k: int,
        block_q: int = 128,
        block_k: int = 128,
        q_perm: torch.Tensor | None = None,
        kv_perm: torch.Tensor | None = None,
        *,
        check: bool = True,
    ) -> BlockLayout:
        """From a bool block mask (B, H, Mq, Mk); kept ids are listed in ascending order.

        With ``check=True`` the CSR rows are as long as the fullest row (one device sync) and
        the layout is validated. ``check=False`` is for masks that keep at least one block in
        every row by construction: nothing is validated and, off the CPU, the rows are padded to
        Mk so that nothing synchronizes and the call can run inside a CUDA graph.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4:
            raise ValueError("mask must be a bool tensor (B, H, Mq, Mk)")
        if mask.shape[3] != num_blocks(n_k, block_k):
            raise ValueError(
                f"mask has {mask.shape[3]} key blocks but n_k={n_k} with block_k={block_k} "
                f"needs {num_blocks(n_k, block_k)}"
            )
        counts = mask.sum(dim=-1)
        if check or mask.device.type == "cpu":  # a host-side maximum costs nothing on the CPU
            kmax = max(1, int(counts.max()) if counts.numel() else 1)
        else:
            kmax = mask.shape[3]
        # stable sort of the negated mask puts kept ids first, in ascending order
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :kmax]
        return cls(
            order.to(torch.int32),
            counts.to(torch.int32),
            n_q,
            n_k,
            block_q,
            block_k,
            q_perm,
            kv_perm,
            check=check,
        )

    def to_dense(self) -> torch.Tensor:
        """Bool block mask (B, H, Mq, Mk)."""
        b, h, mq, _ = self.kv_indices.shape
        mask = torch.zeros(b, h, mq, self.num_k_blocks + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(self.valid_mask(), self.kv_indices.long(), self.num_k_blocks)
        return mask.scatter_(-1, idx, True)[..., :-1]

    def kept_blocks_int8(self) -> torch.Tensor:
        """The block mask as int8 (B, H, Mq, Mk), computed once per layout (kernels read it)."""
        cached = self.__dict__.get("_kept_int8")
        if cached is None:
            cached = self.to_dense().to(torch.int8)
            object.__setattr__(self, "_kept_int8", cached)
        return cached

    def token_mask(self, rows: slice | None = None) -> torch.Tensor:
        """Bool (B, H, len(rows), Nk) kept mask at token level, in permuted coordinates.

        ``rows`` selects permuted query positions; memory is O(len(rows) * Nk).
        """
        rows = rows if rows is not None else slice(0, self.n_q)
        q_block = torch.arange(self.n_q, device=self.device)[rows] // self.block_q
        k_block = torch.arange(self.n_k, device=self.device) // self.block_k
        dense = self.to_dense()[:, :, q_block]
        return dense[..., k_block]

    def to_block_mask(self):  # -> torch.nn.attention.flex_attention.BlockMask
        """A FlexAttention ``BlockMask`` with the same kept blocks (needs PyTorch >= 2.5).

        FlexAttention wants one index slot per key block, so the CSR rows are padded to Mk.
        Ragged last blocks are handled through ``seq_lengths``; tokens are in the layout's
        permuted order, so permute q, k, v the same way before calling ``flex_attention``.
        """
        try:
            from torch.nn.attention.flex_attention import BlockMask
        except ImportError as err:  # pragma: no cover - depends on the installed PyTorch
            raise RuntimeError("to_block_mask needs torch.nn.attention.flex_attention") from err
        if self.block_q != self.block_k:
            raise ValueError("FlexAttention block masks need block_q == block_k")
        n_k = self.n_k

        def inside(b, h, q_idx, kv_idx):
            return kv_idx < n_k

        pad = self.num_k_blocks - self.kv_indices.shape[-1]
        indices = torch.nn.functional.pad(self.kv_indices, (0, pad)) if pad else self.kv_indices
        return BlockMask.from_kv_blocks(
            self.kv_counts,
            indices.contiguous(),
            BLOCK_SIZE=(self.block_q, self.block_k),
            mask_mod=inside,
            seq_lengths=(self.n_q, self.n_k),
        )

    def density(self) -> float:
        """Measured kept fraction of (query, key) pairs, in tokens (ragged blocks counted)."""
        kept_keys = (self.to_dense().to(torch.float64) * self.k_block_sizes().double()).sum(-1)
        pairs = (kept_keys * self.q_block_sizes().double()).sum()
        b, h = self.batch_heads
        return float(pairs / (b * h * self.n_q * self.n_k))

    def inverse_q_perm(self) -> torch.Tensor | None:
        return None if self.q_perm is None else invert_permutation(self.q_perm)

    def inverse_kv_perm(self) -> torch.Tensor | None:
        return None if self.kv_perm is None else invert_permutation(self.kv_perm)

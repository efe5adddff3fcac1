r"""Attention-output error per diffusion step of a sparse run (the paper's Fig. 8b).

Two Wan transformers run in lockstep, a dense one (stock processors) and a sparse one (under a
tailattn ``Handle``). The self-attention output of each layer, ``o`` (B, N, H * D), is read
where Wan's processor hands it to the output projection (a forward pre-hook on
``blocks[l].attn1.to_out[0]``; nothing in the model is replaced). Per step ``i``:

- ``mse_local[i] = mean_l mean((o^sparse_l - A(q_l, k_l, v_l))^2)``, with ``A`` exact attention
  of the sparse run's own q, k, v (seen by a handle observer): the error of the method alone;
- ``mse_vs_dense[i] = mean_l mean((o^sparse_l - o^dense_l)^2)``: sparse against the dense run at
  the same step, which includes the error carried along the trajectory.

Layers that run dense (warm-up steps, dense layers) count with their (zero) error. One step is
one transformer call per model (guidance branches batched); :meth:`end_step` closes a step.

The dense run can also be one recorded before (``recorded``: per step, each layer's output),
so that several sparse runs from the same noise share one dense run.

Exact attention in float32 over every query row costs a full attention per layer and step.
With ``rows`` = R the probe computes it for R query rows only, drawn uniformly without
replacement (seeded; the same rows at every call of a sequence length), and ``mse_local`` is
the mean over those rows: an unbiased estimate of the mean over all N rows at R / N of the
cost. ``mse_vs_dense`` always covers every row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F


def hook_attention_outputs(
    transformer: torch.nn.Module, hook_of: Callable[[int], Callable[..., None]]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register ``hook_of(layer)`` as a forward pre-hook on each block's self-attention output
    projection (``blocks[layer].attn1.to_out[0]``: its input is the attention output, (B, N,
    H * D)); returns the handles."""
    return [
        block.attn1.to_out[0].register_forward_pre_hook(hook_of(layer))
        for layer, block in enumerate(transformer.blocks)
    ]


class AttentionProbe:
    """Records per-step attention-output MSE (module docstring); a context manager."""

    def __init__(
        self,
        dense: torch.nn.Module | None,
        sparse: torch.nn.Module,
        handle: Any,
        rows: int | None = None,
        seed: int = 0,
        recorded: Sequence[Mapping[int, torch.Tensor]] | None = None,
    ) -> None:
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"rows must be a positive integer or None, got {rows!r}")
        if (dense is None) == (recorded is None):
            raise ValueError("give either the dense transformer or its recorded outputs")
        self._recorded = recorded
        self._step = 0
        self.rows = rows
        self._seed = seed
        self._picked: dict[tuple[int, str], torch.Tensor] = {}
        self.mse_local: list[float] = []
        self.mse_vs_dense: list[float] = []
        self._handle = handle
        self._dense_out: dict[int, torch.Tensor] = {}
        self._exact: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # output, rows
        self._local: list[float] = []
        self._trajectory: list[float] = []
        self._hooks = [] if dense is None else hook_attention_outputs(dense, self._dense_hook)
        self._hooks += hook_attention_outputs(sparse, self._sparse_hook)

    def _dense_hook(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._dense_out[layer] = args[0].detach().float()

        return hook

    def _sparse_hook(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            out = args[0].detach().float()
            exact, rows = self._exact.pop(layer)
            local = out if rows is None else out[:, rows]
            self._local.append(float(((local - exact) ** 2).mean()))
            if self._recorded is None:
                dense = self._dense_out.pop(layer)
            else:
                dense = self._recorded[self._step][layer].float()
            self._trajectory.append(float(((out - dense) ** 2).mean()))

        return hook

    def observe(
        self,
        layer: int,
        tick: object,
        grid: tuple[int, int, int],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: object,
        mask: torch.Tensor | None,
    ) -> None:
        """Exact attention of the sparse run's q, k, v (B, N, H, D) -> (B, N or R, H * D) at
        every query row, or at the sampled ones (module docstring)."""
        rows = self._rows(q.shape[1], q.device)
        if rows is not None:
            q = q[:, rows]
            if mask is not None and mask.shape[-2] != 1:  # a mask per query row
                mask = mask[..., rows, :]
        exact = F.scaled_dot_product_attention(
            *(x.transpose(1, 2).float() for x in (q, k, v)), attn_mask=mask
        )
        self._exact[layer] = exact.transpose(1, 2).flatten(2), rows

    def _rows(self, n: int, device: torch.device) -> torch.Tensor | None:
        """The sampled query rows of sequence length ``n`` (sorted), ``None`` for every row."""
        if self.rows is None or self.rows >= n:
            return None
        key = (n, str(device))
        if key not in self._picked:
            gen = torch.Generator().manual_seed(self._seed)
            picked = torch.randperm(n, generator=gen)[: self.rows].sort().values
            self._picked[key] = picked.to(device)
        return self._picked[key]

    def end_step(self) -> None:
        """Close one diffusion step: average the layers' errors of this step.

        Raises:
            ValueError: no layer ran since the last step, or the two runs called different
                layers.
        """
        if not self._local or self._dense_out or self._exact:
            raise ValueError(
                "the dense and the sparse transformer must each run once per step before end_step()"
            )
        self.mse_local.append(sum(self._local) / len(self._local))
        self.mse_vs_dense.append(sum(self._trajectory) / len(self._trajectory))
        self._local.clear()
        self._trajectory.clear()
        self._step += 1

    def __enter__(self) -> AttentionProbe:
        self._handle.add_observer(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.remove_observer(self)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

r"""Flow-matching Euler sampling of the toy model, and dense vs sparse runs from the same noise.

Schedule (Wan's shifted flow-matching schedule): ``S`` steps over ``s_i = 1 - i / S`` and

    sigma_i = shift s_i / (1 + (shift - 1) s_i),   i = 0..S   (sigma_0 = 1, sigma_S = 0).

Euler step from noise ``x_0 ~ N(0, I)`` at ``sigma_0 = 1`` to the clip at ``sigma_S = 0``:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i, label),

with classifier-free guidance ``v = v_null + g (v_label - v_null)`` when ``g != 1`` (both
branches as one batch of 2B, so each step is one transformer call).

:func:`dense_and_sparse` runs the dense model and a sparse copy (``apply``) in lockstep from the
same noise and measures the attention error per step with an :class:`probe.AttentionProbe`;
given a :class:`DenseRun` (:func:`dense_run`: the dense run recorded once) it runs the sparse
copy only, against the recording: the same numbers, one transformer call per step fewer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_positive
from . import data
from .model import ToyModel
from .probe import AttentionProbe, hook_attention_outputs


def clip_of(model: ToyModel) -> tuple[int, int, int]:
    """(frames, height, width) of the clips ``model`` was trained on."""
    return model.config.frames, model.config.size, model.config.size


def shifted(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels ``shift s / (1 + (shift - 1) s)`` of levels ``s`` in [0, 1] (a shift above
    1 moves them towards 1, more noise; 0 and 1 stay)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


def sigmas(steps: int, shift: float) -> torch.Tensor:
    """The ``steps + 1`` noise levels (float64) from 1 to 0 (module docstring)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def noise(
    seed: int, batch: int, shape: tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """Gaussian noise (batch, *shape) from a CPU generator: the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen).to(device)


def velocity(
    model: ToyModel, x: torch.Tensor, sigma: float, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The (guided) velocity at ``x`` and noise level ``sigma`` (module docstring)."""
    t = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
    if guidance == 1.0:
        return model(x, t, labels)
    null = torch.full_like(labels, model.null_label)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample(
    model: ToyModel,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    shift: float,
    guidance: float = 1.0,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Clips (B, 3, F, H, W) from noise ``x`` (same shape) by Euler steps (module docstring);
    ``on_step(i)`` after each step."""
    levels = sigmas(steps, shift).tolist()
    for i in range(steps):
        x = x + (levels[i + 1] - levels[i]) * velocity(model, x, levels[i], labels, guidance)
        if on_step is not None:
            on_step(i)
    return x


def sample_batches(
    model: ToyModel,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch: int,
    steps: int,
    shift: float,
    guidance: float = 1.0,
) -> torch.Tensor:
    """:func:`sample` over ``batch`` clips of ``x`` at a time (bounded memory), concatenated."""
    check_positive(batch, "batch", integer=True)
    settings = {"steps": steps, "shift": shift, "guidance": guidance}
    parts = [
        sample(model, x[i : i + batch], labels[i : i + batch], **settings)
        for i in range(0, x.shape[0], batch)
    ]
    return torch.cat(parts)


@dataclass(frozen=True)
class Comparison:
    """Dense and sparse clips from the same noise, and the attention error per step.

    ``mse_local[i]``: mean over layers of the MSE between the sparse run's attention output at
    step i and exact attention of the same q, k, v (the error the method makes at that step).
    ``mse_vs_dense[i]``: mean over layers of the MSE between the sparse run's attention output
    and the dense run's at step i (the error accumulated along the trajectory).
    ``calls``: the handle's ``LayerCall`` log (which steps and layers ran dense).
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    mse_local: list[float]
    mse_vs_dense: list[float]
    calls: tuple[Any, ...]


@dataclass(frozen=True)
class DenseRun:
    """A dense run kept for comparison with sparse runs from the same noise: ``settings`` (seed,
    labels, steps, shift, guidance, size), the final ``clips`` and ``outputs``, per step each
    layer's self-attention output as the model produced it (bf16 under autocast: at the toy's
    16,384 tokens, 4 clips and 20 steps 1.3 GB)."""

    settings: tuple[Any, ...]
    clips: torch.Tensor
    outputs: tuple[dict[int, torch.Tensor], ...]


def _settings(
    model: ToyModel,
    seed: int,
    labels: torch.Tensor,
    steps: int,
    shift: float,
    guidance: float,
    size: tuple[int, int, int] | None,
) -> tuple[Any, ...]:
    return (seed, tuple(labels.tolist()), steps, shift, guidance, tuple(size or clip_of(model)))


def _start(
    model: ToyModel, seed: int, labels: torch.Tensor, size: tuple[int, int, int] | None
) -> torch.Tensor:
    """The starting noise of a run from seed ``seed`` at ``size`` (default ``clip_of(model)``)."""
    device = next(model.parameters()).device
    return noise(seed, labels.shape[0], (data.CHANNELS, *(size or clip_of(model))), device)


@torch.no_grad()
def dense_run(
    model: ToyModel,
    *,
    seed: int,
    labels: torch.Tensor,
    steps: int,
    shift: float,
    guidance: float = 1.0,
    size: tuple[int, int, int] | None = None,
) -> DenseRun:
    """Sample densely from the noise of seed ``seed`` (as :func:`dense_and_sparse` does) and
    record each step's self-attention outputs (:class:`DenseRun`)."""
    x = _start(model, seed, labels, size)
    current: dict[int, torch.Tensor] = {}
    outputs: list[dict[int, torch.Tensor]] = []

    def keep(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            current[layer] = args[0].detach().clone()

        return hook

    hooks = hook_attention_outputs(model.transformer, keep)

    def end_step(i: int) -> None:
        outputs.append(dict(current))
        current.clear()

    try:
        x = sample(model, x, labels, steps=steps, shift=shift, guidance=guidance, on_step=end_step)
    finally:
        for hook in hooks:
            hook.remove()
    settings = _settings(model, seed, labels, steps, shift, guidance, size)
    return DenseRun(settings, x, tuple(outputs))


@torch.no_grad()
def dense_and_sparse(
    model: ToyModel,
    method: str,
    keep: float | str | None,
    *,
    seed: int,
    labels: torch.Tensor,
    steps: int,
    shift: float,
    guidance: float = 1.0,
    warmup_steps: int = 0,
    size: tuple[int, int, int] | None = None,
    on_step: Callable[[int], None] | None = None,
    probe_rows: int | None = None,
    dense: DenseRun | None = None,
) -> Comparison:
    """Sample densely with ``model`` and sparsely with a copy under ``apply(copy, method, keep,
    warmup_steps=...)`` in lockstep from the same noise (seed ``seed``) at ``size`` (frames,
    height, width; default: the clip the model was trained on, ``clip_of(model)``).
    ``probe_rows``: query rows of the exact attention behind ``mse_local`` (default every row;
    :class:`probe.AttentionProbe`). ``dense``: the dense run, recorded before by
    :func:`dense_run` with the same settings, instead of running it again.

    Raises:
        ValueError: ``dense`` was recorded with other settings.
    """
    from ..integrations.diffusers import apply

    if dense is not None and dense.settings != _settings(
        model, seed, labels, steps, shift, guidance, size
    ):
        raise ValueError(
            f"the dense run was recorded with other settings: {dense.settings} (seed, labels, "
            "steps, shift, guidance, size)"
        )
    x_dense = _start(model, seed, labels, size)
    x_sparse = x_dense.clone()
    sparse_model = copy.deepcopy(model)
    levels = sigmas(steps, shift).tolist()
    handle = apply(sparse_model.transformer, method, keep=keep, warmup_steps=warmup_steps)
    try:
        probe = AttentionProbe(
            None if dense is not None else model.transformer,
            sparse_model.transformer,
            handle,
            rows=probe_rows,
            seed=seed,
            recorded=None if dense is None else dense.outputs,
        )
        with probe:
            for i in range(steps):
                dt = levels[i + 1] - levels[i]
                if dense is None:
                    x_dense = x_dense + dt * velocity(model, x_dense, levels[i], labels, guidance)
                x_sparse = x_sparse + dt * velocity(
                    sparse_model, x_sparse, levels[i], labels, guidance
                )
                probe.end_step()
                if on_step is not None:
                    on_step(i)
        calls = handle.calls
    finally:
        handle.remove()
    if dense is not None:
        x_dense = dense.clips
    return Comparison(x_dense, x_sparse, probe.mse_local, probe.mse_vs_dense, calls)

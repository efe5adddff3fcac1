"""Capture q, k, v of a diffusers video transformer, exactly as attention sees them.

Usage::

    with tailattn.integrations.diffusers.capture(pipe, "wan.safetensors", layers=[0, 15],
                                                 steps=[0, 25, 49]):
        pipe(prompt="...", num_inference_steps=50)

q, k, v are taken after the projections, the q/k normalization and the rotary embedding,
where the stock processor would call attention, and streamed to disk one tensor at a time
(``tailattn.capture_file.CaptureWriter``) in the capture format: (B, H, N, D) per
(layer, step), video tokens in (t, h, w) order followed by the ``text_tokens`` text tokens
(CogVideoX's text-first sequence is reordered; padded text tokens that HunyuanVideo masks out are
dropped, so dense attention over the captured q, k, v is the layer's attention). Only one
guidance branch is recorded (``branch``, default 0: the first transformer call of a step, the
conditional pass in Wan and HunyuanVideo pipelines); with guidance as a batch of 2 (CogVideoX)
both halves are in the batch. Under a sparse handle (``handle.capture``) the captured q, k, v are
those of the sparse run.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from .clock import Tick
from .handle import Handle, apply
from .joint import TokenOrder, key_mask
from .schedule import check_index


class Sink(Protocol):
    """Where captured tensors go: ``tailattn.capture_file.CaptureWriter`` or any object with
    this ``add`` (the caller then opens and closes it)."""

    def add(
        self,
        layer: int,
        step: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        timestep: float | None = None,
    ) -> None: ...


def _indices(value: Iterable[int] | None, name: str) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a collection of indices such as [0, 10], got {value!r}")
    return frozenset(check_index(i, name) for i in value)


def _model_name(model: torch.nn.Module) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else type(model).__name__


class CaptureSession:
    """Records the chosen layers and steps while active; a context manager.

    On a clean exit the capture file is written (temporary name, then renamed); on an error it
    is discarded. With a sink object instead of a path, the caller owns the sink.
    """

    def __init__(
        self,
        handle: Handle,
        target: str | Path | Sink,
        *,
        layers: Iterable[int] | None,
        steps: Iterable[int] | None,
        branch: int,
        model_name: str | None,
        meta: dict[str, Any],
        owns_handle: bool = False,
    ) -> None:
        handle.check_observable()  # before anything: capture() then removes its own handle
        self.patched = patched = frozenset.intersection(*handle.layers)
        self.layers = _indices(layers, "layers")
        missing = sorted((self.layers or patched) - patched)
        if missing:
            raise ValueError(
                f"layers {missing} are not patched by this handle (patched: {sorted(patched)}); "
                f"capture patched layers only"
            )
        self.steps = _indices(steps, "steps")
        self.branch = check_index(branch, "branch")
        if isinstance(target, (str, Path)):
            self.path: Path | None = Path(target)
            if not self.path.parent.is_dir():
                raise ValueError(
                    f"cannot write capture {self.path}: no directory {self.path.parent}"
                )
            self._sink: Sink | None = None
        elif callable(getattr(target, "add", None)):
            self.path, self._sink = None, target
        else:
            raise TypeError(
                f"capture target must be a file path or an object with add(layer, step, q, k, v, "
                f"timestep), got {type(target).__name__}"
            )
        self.model_name = model_name or _model_name(handle.models[0])
        self.meta = dict(meta)
        self.entries = 0
        self._handle, self._owns_handle = handle, owns_handle
        self._writer: Any = None

    @property
    def bytes_written(self) -> int:
        """Tensor bytes written to the capture file so far (0 with a caller's sink)."""
        return getattr(self._writer, "bytes_written", 0)

    def __enter__(self) -> CaptureSession:
        self._handle.add_observer(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.remove_observer(self)
        try:
            if self._writer is not None:
                if exc_type is None:
                    self._writer.close()
                else:
                    self._writer.abort()
            elif exc_type is None and self.path is not None:
                raise ValueError(
                    f"nothing was captured to {self.path}: steps "
                    f"{sorted(self.steps) if self.steps is not None else 'all'} of layers "
                    f"{sorted(self.layers) if self.layers is not None else 'all'} (branch "
                    f"{self.branch}) never ran"
                )
        finally:
            if self._owns_handle:
                self._handle.remove()

    def observe(
        self,
        layer: int,
        tick: Tick,
        grid: tuple[int, int, int],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: TokenOrder,
        mask: torch.Tensor | None,
    ) -> None:
        """Record one call if it is a chosen (layer, step, branch): (B, H, N, D), text last."""
        if (
            tick.branch != self.branch
            or (self.layers is not None and layer not in self.layers)
            or (self.steps is not None and tick.step not in self.steps)
        ):
            return
        q, k, v = (self._video_then_text(x, order, mask) for x in (q, k, v))
        n_text = q.shape[2] - grid[0] * grid[1] * grid[2]
        sink = self._sink if self._sink is not None else self._open(grid, n_text)
        sink.add(layer, tick.step, q, k, v, timestep=tick.timestep)
        self.entries += 1

    @staticmethod
    def _video_then_text(
        x: torch.Tensor, order: TokenOrder, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, N, H, D) in model order -> (B, H, N, D) with the valid text tokens last."""
        if order.n_text == 0:
            return x.transpose(1, 2)
        text = order.text(x)
        keys = key_mask(mask, x.shape[1], x.shape[0])
        if keys is not None:
            valid = order.text(keys)
            if not bool((valid == valid[:1]).all()):
                raise ValueError(
                    "cannot capture text tokens that are masked differently per batch element; "
                    "capture one prompt at a time"
                )
            text = text[:, valid[0]]
        return torch.cat([order.video(x), text], dim=1).transpose(1, 2)

    def _open(self, grid: tuple[int, int, int], n_text: int) -> Sink:
        if self._writer is None:
            from ...capture_file import CaptureWriter

            assert self.path is not None
            self._writer = CaptureWriter(
                self.path,
                model=self.model_name,
                grid=grid,
                text_tokens=n_text,
                source=type(self._handle.models[0]).__name__,
                branch=self.branch,
                diffusers=importlib.metadata.version("diffusers"),
                **self.meta,
            )
        return self._writer


def capture(
    model_or_handle: object,
    target: str | Path | Sink,
    *,
    layers: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    branch: int = 0,
    model_name: str | None = None,
    **meta: Any,
) -> CaptureSession:
    """Capture q, k, v while a pipeline runs (module docstring); use as a context manager.

    Args:
        model_or_handle: a supported transformer or a pipeline holding one: the chosen layers
            run dense through the stock attention backend, and tailattn is removed from the
            model when the block exits. Or a :class:`Handle` from ``apply``: capture the q, k, v
            of that (sparse) run; the handle stays applied.
        target: the capture file to write, or a sink object with ``add`` (``Sink``).
        layers: layer indices to record (default all).
        steps: diffusion step indices to record (default all).
        branch: which transformer call of a step to record (0: the first).
        model_name: ``model`` in the file's metadata (default the model's ``_name_or_path``).
        **meta: further JSON-serializable metadata.
    """
    if isinstance(model_or_handle, Handle):
        handle, owns = model_or_handle, False
    else:
        chosen = _indices(layers, "layers")
        handle, owns = apply(model_or_handle, "full", keep=None, layers=chosen), True
    try:
        return CaptureSession(
            handle,
            target,
            layers=layers,
            steps=steps,
            branch=branch,
            model_name=model_name,
            meta=meta,
            owns_handle=owns,
        )
    except (TypeError, ValueError):
        if owns:
            handle.remove()
        raise

"""The toy model behind a diffusers-like pipeline call, for code written against pipelines.

``ToyPipeline(model)(prompt="a red disc", num_inference_steps=20, generator=...)`` samples one
clip (``sample.sample``) for the shape named in the prompt, calling
``callback_on_step_end(pipe, step, timestep, {})`` after each step as diffusers pipelines do;
``pipe.transformer`` is the Wan transformer, so ``apply(pipe, ...)`` and ``capture(pipe, ...)``
work on it. ``tailattn capture --model toy`` loads it (:func:`load_pipeline`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data
from .model import ToyModel
from .sample import clip_of, sample

DEFAULT_SHIFT = 2.0
"""Shift of the sampling schedule (``sample.sigmas``) used by default everywhere."""

DEFAULT_GUIDANCE = 3.0
"""Classifier-free guidance of the model's own samples: the frame strip written after training
and the quality measured by ``scripts/toy_report.py``."""


def label_of(prompt: str | int) -> int:
    """The shape index named in a prompt (``"disc"``, ``"a red disc"``, ``"1"`` or ``1``).

    Raises:
        ValueError: no shape or more than one shape named.
    """
    if isinstance(prompt, int) or prompt.strip().isdigit():
        index = int(prompt)
        if 0 <= index < len(data.SHAPES):
            return index
        raise ValueError(f"label index must be in [0, {len(data.SHAPES)}), got {index}")
    words = prompt.lower().replace(",", " ").split()
    named = sorted({data.SHAPES.index(w) for w in words if w in data.SHAPES})
    if len(named) != 1:
        raise ValueError(
            f"the toy model draws one shape kind per clip; name exactly one of "
            f"{', '.join(data.SHAPES)} (got {prompt!r})"
        )
    return named[0]


@dataclass(frozen=True)
class ToyOutput:
    """``frames``: (B, 3, F, H, W) in [-1, 1] (also for ``output_type="latent"``: pixel space)."""

    frames: torch.Tensor


class ToyPipeline:
    """A pipeline-shaped wrapper of a :class:`ToyModel` (module docstring)."""

    def __init__(self, model: ToyModel, shift: float = DEFAULT_SHIFT) -> None:
        self.model = model
        self.shift = shift
        self.progress_disabled = False

    @property
    def transformer(self) -> torch.nn.Module:
        return self.model.transformer

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Accepted for diffusers compatibility; the toy pipeline draws no progress bar."""
        self.progress_disabled = disable

    def to(self, device: torch.device | str) -> ToyPipeline:
        self.model.to(device)
        return self

    def __call__(
        self,
        prompt: str | int = "disc",
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        guidance_scale: float = 1.0,
        callback_on_step_end: Callable[..., Any] | None = None,
        **_: Any,
    ) -> ToyOutput:
        """One clip of the shape named in ``prompt`` (module docstring); ``height``, ``width``
        (even) and ``num_frames`` default to the clip the model was trained on."""
        parameter = next(self.model.parameters())
        frames, size, _ = clip_of(self.model)
        shape = (data.CHANNELS, num_frames or frames, height or size, width or size)
        if shape[2] % 2 or shape[3] % 2:
            raise ValueError(f"height and width must be even (patch 2 x 2), got {shape[2:]}")
        x = torch.randn(1, *shape, generator=generator).to(parameter.device, parameter.dtype)
        labels = torch.tensor([label_of(prompt)], device=parameter.device)

        def on_step(step: int) -> None:
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, None, {})

        frames = sample(
            self.model,
            x,
            labels,
            steps=num_inference_steps,
            shift=self.shift,
            guidance=guidance_scale,
            on_step=on_step,
        )
        return ToyOutput(frames)


def load_pipeline(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights: Path | None = None,
) -> ToyPipeline:
    """The toy pipeline with the shipped weights (or those in ``weights``)."""
    from .weights import load

    return ToyPipeline(load(weights, device).to(dtype))

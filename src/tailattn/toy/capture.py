"""Capture files of the toy model: q, k, v of its self-attention at several diffusion steps.

:func:`write_toy_capture` samples one clip, of the size the model was trained on, with the toy
pipeline (``pipeline.ToyPipeline``, dense attention, float32) inside
``tailattn.integrations.diffusers.capture`` and writes the chosen (layer, step) entries,
(1, H, N, D) each (the default config: 8 heads, N = 16,384 on the 16 x 32 x 32 grid, D = 32),
to a capture file (``tailattn.capture_file``): real attention of a trained video DiT for the study,
with no download. By default: the first, middle and last layer at four steps spread over a
10-step run (``0, S // 3, 2 S // 3, S - 1``). On a 2-core CPU the default config takes about
30 s per step at its training size; with CUDA, seconds in all.

    python -m tailattn.toy.capture --out toy.safetensors --device cuda --weights DIR
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
import typer

from .pipeline import ToyPipeline, label_of, load_pipeline


def default_layers(pipe: ToyPipeline) -> list[int]:
    """First, middle and last layer of the toy transformer."""
    count = len(pipe.transformer.blocks)
    return sorted({0, count // 2, count - 1})


def default_steps(steps: int) -> list[int]:
    """Four steps spread over a run of ``steps``: ``0, S // 3, 2 S // 3, S - 1``."""
    return sorted({0, steps // 3, 2 * steps // 3, steps - 1})


def write_toy_capture(
    path: Path,
    *,
    seed: int = 0,
    label: str = "disc",
    steps: int = 10,
    layers: Sequence[int] | None = None,
    record_steps: Sequence[int] | None = None,
    weights: Path | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """Write a capture of the toy model (module docstring) to ``path``; returns ``path``.

    Args:
        path: the capture file (.safetensors); its directory must exist.
        seed: noise seed of the sampled clip.
        label: the shape to draw (``data.SHAPES``).
        steps: diffusion steps of the run.
        layers: layers to record (default :func:`default_layers`).
        record_steps: steps to record (default :func:`default_steps`).
        weights: toy weights directory (default: the shipped weights).
        device: where to run.
    """
    from ..integrations.diffusers import capture

    pipe = load_pipeline(torch.float32, device, weights)
    chosen_layers = default_layers(pipe) if layers is None else list(layers)
    chosen_steps = default_steps(steps) if record_steps is None else list(record_steps)
    with capture(
        pipe,
        path,
        layers=chosen_layers,
        steps=chosen_steps,
        model_name="toy",
        prompt=label,
        label=label_of(label),
        seed=seed,
        num_inference_steps=steps,
        shift=pipe.shift,
    ):
        pipe(
            prompt=label,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
        )
    return path


def capture_command(
    out: Annotated[Path, typer.Option(help="capture file to write (.safetensors)")],
    weights: Annotated[
        Path | None, typer.Option(help="toy weights directory (default: the shipped weights)")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cuda or cpu")] = "cpu",
    steps: Annotated[int, typer.Option(help="diffusion steps of the run")] = 10,
    label: Annotated[str, typer.Option(help="the shape to draw")] = "disc",
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
) -> None:
    """Write a capture of the toy model (module docstring)."""
    path = write_toy_capture(
        out, seed=seed, label=label, steps=steps, weights=weights, device=device
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    typer.run(capture_command)

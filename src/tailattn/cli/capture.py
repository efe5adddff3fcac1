"""``tailattn capture``: run a local diffusers video pipeline and capture q, k, v to a file.

Needs the ``diffusers`` extra. It loads the
pipeline (``DiffusionPipeline.from_pretrained``), runs it once with ``output_type="latent"``
(no VAE decode), and writes the chosen layers and steps with ``capture`` (see ``capture`` for
what is recorded). The diffusion steps show as a progress bar.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

DTYPES = ("bfloat16", "float16", "float32")
TOY = "toy"
"""``--model toy``: the project's toy video DiT, shipped with the package."""
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_indices(text: str, name: str) -> list[int]:
    """``"0,5,10-12"`` -> ``[0, 5, 10, 11, 12]`` (ranges inclusive).

    Raises:
        ValueError: anything else, naming ``name``.
    """
    indices: set[int] = set()
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise ValueError(
                f"{name} must be comma-separated indices or ranges such as '0,5,10-12', "
                f"got {text!r}"
            )
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"{name} has a decreasing range {part.strip()!r} in {text!r}")
        indices.update(range(first, last + 1))
    return sorted(indices)


def _looks_like_hub_id(model: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")


def _load_pipeline(model: str, dtype: Any, device: str) -> Any:
    """A diffusers pipeline from a local directory (or a hub id), on ``device``; ``toy``: the
    project's toy model (``tailattn.toy.pipeline``)."""
    if model == TOY:
        from ..toy.pipeline import load_pipeline

        return load_pipeline(dtype, device)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return pipe.to(device)


def capture_command(
    model: Annotated[
        str,
        typer.Option(help="diffusers pipeline: a local directory (or a Hugging Face id), or 'toy'"),
    ],
    prompt: Annotated[str, typer.Option(help="text prompt")],
    out: Annotated[Path, typer.Option(help="capture file to write (.safetensors)")],
    layers: Annotated[
        str | None, typer.Option(help="layer indices to record, e.g. '0,15,28-29' (default all)")
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="diffusion steps to record, e.g. '0,25,49' (default all)")
    ] = None,
    height: Annotated[int | None, typer.Option(help="video height in pixels")] = None,
    width: Annotated[int | None, typer.Option(help="video width in pixels")] = None,
    frames: Annotated[int | None, typer.Option(help="number of video frames")] = None,
    num_steps: Annotated[int, typer.Option(help="diffusion steps of the run")] = 50,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    device: Annotated[
        str | None, typer.Option(help="torch device (default cuda when available)")
    ] = None,
    branch: Annotated[
        int, typer.Option(help="transformer call of a step to record (0: conditional)")
    ] = 0,
) -> None:
    """Run a diffusers video pipeline and write q, k, v (after norm and RoPE) to a capture."""
    try:
        chosen_layers = None if layers is None else parse_indices(layers, "--layers")
        chosen_steps = None if steps is None else parse_indices(steps, "--steps")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    import torch

    if model == TOY:
        from ..toy.pipeline import label_of

        try:
            label_of(prompt)
        except ValueError as err:
            raise typer.BadParameter(f"--prompt: {err}") from None
    if num_steps < 1:
        raise typer.BadParameter(f"--num-steps must be at least 1, got {num_steps}")
    if model != TOY and not Path(model).is_dir() and not _looks_like_hub_id(model):
        raise typer.BadParameter(f"--model {model!r} is neither a directory nor a hub id")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from ..integrations.diffusers import capture
    except ImportError as err:
        Console().print(f"[red]error:[/red] tailattn capture needs diffusers ({err})")
        raise typer.Exit(2) from None
    pipe = _load_pipeline(model, getattr(torch, dtype), device)
    pipe.set_progress_bar_config(disable=True)
    size = {"height": height, "width": width, "num_frames": frames}
    size = {key: value for key, value in size.items() if value is not None}
    columns = (TextColumn("capture"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        session = capture(
            pipe,
            out,
            layers=chosen_layers,
            steps=chosen_steps,
            branch=branch,
            model_name=model,
            prompt=prompt,
            seed=seed,
            num_inference_steps=num_steps,
        )
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    with Progress(*columns) as progress, session:
        task = progress.add_task("steps", total=num_steps)

        told = False

        def advance(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
            nonlocal told
            progress.advance(task)
            if not told and session.entries:  # the first recorded step: say what is coming
                told = True
                layers = len(session.layers or session.patched)
                steps = len(session.steps or range(num_steps))
                per_entry = session.bytes_written / session.entries
                progress.console.print(
                    f"capture: {layers * steps} entries of {per_entry / 2**20:.1f} MB, about "
                    f"{layers * steps * per_entry / 2**30:.2f} GB in {out} "
                    f"(--layers and --steps record fewer)"
                )
            return {}

        pipe(
            prompt=prompt,
            num_inference_steps=num_steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
            callback_on_step_end=advance,
            **size,
        )
    Console().print(f"wrote {out}: {session.entries} entries (layer, step)")

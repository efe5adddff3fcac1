"""``tailattn generate``: dense and sparse video from the same noise with the toy model.

The project's CLI registers :func:`generate_command` as its ``generate`` command. It samples the
toy model (``sample.dense_and_sparse``) densely and with a tailattn method from the same noise,
shows the diffusion steps as a progress bar, prints the attention-output MSE per step (averaged
over layers; ``probe``) and the PSNR and SSIM of the sparse video against the dense one
(``quality``), and writes a side-by-side animation (dense left, sparse right) as GIF, and MP4
when imageio-ffmpeg is installed (``strip``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..methods import Method, registry
from . import data
from .pipeline import DEFAULT_SHIFT, label_of
from .quality import psnr, ssim
from .sample import Comparison, dense_and_sparse
from .strip import save_animation, side_by_side

DEFAULT_KEEP = 0.1


def keep_for(method: str, keep: float | None) -> float | None:
    """``keep``, or :data:`DEFAULT_KEEP` for a method whose selection takes a keep ratio and
    ``None`` for one that does not (``full``, ``topp``...).

    Raises:
        ValueError: an unparsable spec or an unknown selection.
    """
    if keep is not None:
        return keep
    selection = Method.parse(method).selection
    entry = registry.selections().get(selection)
    if entry is None:
        raise ValueError(
            f"unknown selection {selection!r} in method {method!r}; known: "
            f"{', '.join(registry.selections())}"
        )
    return DEFAULT_KEEP if "keep" in entry.params else None


def _print_report(console: Console, result: Comparison, seconds: float) -> None:
    table = Table(title="attention-output MSE per step (mean over layers)")
    for name in ("step", "sparse", "vs exact attention", "vs dense run"):
        table.add_column(name, justify="right")
    dense_steps = {call.step for call in result.calls if call.dense}
    for step, (local, trajectory) in enumerate(
        zip(result.mse_local, result.mse_vs_dense, strict=True)
    ):
        table.add_row(
            str(step), "no" if step in dense_steps else "yes", f"{local:.3e}", f"{trajectory:.3e}"
        )
    console.print(table)
    sparse_steps = [i for i in range(len(result.mse_local)) if i not in dense_steps] or [0]
    mean_local = sum(result.mse_local[i] for i in sparse_steps) / len(sparse_steps)
    value = psnr(result.sparse, result.dense)
    console.print(
        f"sparse attention calls: {sum(not c.dense for c in result.calls)} of "
        f"{len(result.calls)}; mean MSE over sparse steps {mean_local:.3e}"
    )
    console.print(
        f"PSNR(sparse, dense) = {'inf' if math.isinf(value) else f'{value:.2f}'} dB, "
        f"SSIM = {ssim(result.sparse, result.dense):.4f}  ({seconds:.1f} s)"
    )


def generate_command(
    method: Annotated[str, typer.Option(help="tailattn method spec, e.g. 'radial+uta'")] = (
        "block-topk+uta"
    ),
    keep: Annotated[
        float | None, typer.Option(help=f"keep ratio of budgeted methods (default {DEFAULT_KEEP})")
    ] = None,
    steps: Annotated[int, typer.Option(help="diffusion steps")] = 20,
    warmup_steps: Annotated[
        int | None, typer.Option(help="dense first steps (default a quarter of --steps)")
    ] = None,
    seed: Annotated[int, typer.Option(help="noise seed, the same for both runs")] = 0,
    label: Annotated[str, typer.Option(help=f"shape: {', '.join(data.SHAPES)}")] = "disc",
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 1.0,
    shift: Annotated[float, typer.Option(help="shift of the sampling schedule")] = DEFAULT_SHIFT,
    frames: Annotated[int, typer.Option(help="frames (the model was trained on 16)")] = (
        data.FRAMES
    ),
    size: Annotated[int, typer.Option(help="height = width, even (trained on 32)")] = data.SIZE,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default cuda when available)")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="toy weights directory (default: the shipped weights)")
    ] = None,
    out: Annotated[Path, typer.Option(help="directory for the animation")] = Path(
        "tailattn-generate"
    ),
) -> None:
    """Generate a toy video densely and sparsely from the same noise; compare them."""
    from .weights import WeightsError, load

    if steps < 1:
        raise typer.BadParameter(f"--steps must be at least 1, got {steps}")
    warmup = steps // 4 if warmup_steps is None else warmup_steps
    if not 0 <= warmup <= steps:
        raise typer.BadParameter(f"--warmup-steps must be in [0, {steps}], got {warmup}")
    if frames < 1 or size < 2 or size % 2:
        raise typer.BadParameter(
            f"--frames must be at least 1 and --size even and at least 2, got {frames}, {size}"
        )
    try:
        index = label_of(label)
        keep = keep_for(method, keep)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda, but CUDA is not available")
    try:
        model = load(weights, device)
    except WeightsError as err:
        raise typer.BadParameter(str(err)) from None
    console = Console()
    labels = torch.tensor([index], device=device)
    columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    start = time.perf_counter()
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("steps", total=steps)
            result = dense_and_sparse(
                model,
                method,
                keep,
                seed=seed,
                labels=labels,
                steps=steps,
                shift=shift,
                guidance=guidance,
                warmup_steps=warmup,
                size=(frames, size, size),
                on_step=lambda _: progress.advance(task),
            )
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    _print_report(console, result, time.perf_counter() - start)
    frames = side_by_side(result.dense[0], result.sparse[0])
    name = f"{data.SHAPES[index]}-seed{seed}-{method.replace('+', '_')}"
    written = save_animation(frames, out, name)
    console.print(f"dense (left) and sparse (right): {', '.join(str(p) for p in written)}")

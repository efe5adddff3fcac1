"""``tailattn generate``: dense and sparse video from the same noise with the toy model.

Needs the ``diffusers`` extra. It samples the toy model (``toy.sample.dense_and_sparse``) densely
and with a tailattn method from the same noise, shows the diffusion steps as a progress bar,
prints the attention-output MSE per step (averaged over layers; ``toy.probe``) and the PSNR and
SSIM of the sparse video against the dense one (``toy.quality``), and writes a side-by-side
animation (dense left, sparse right) as GIF, and MP4 when imageio-ffmpeg is installed
(``toy.strip``). Its default clip, 8 frames of 32 x 32 (2,048 tokens), is smaller than the
model's training clip (``config`` in the weights' card; 16 x 64 x 64 for the default config) so
that the default run takes about a minute on a 2-core CPU.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_CLIP = (8, 32)
"""Frames and height = width of the default clip (module docstring)."""


def _print_report(console: Console, result: Any, seconds: float) -> None:
    from ..toy.quality import psnr, ssim

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
        float | None,
        typer.Option(help="keep ratio of budgeted methods (default: apply()'s, 0.1)"),
    ] = None,
    steps: Annotated[int, typer.Option(help="diffusion steps")] = 20,
    warmup_steps: Annotated[
        int | None, typer.Option(help="dense first steps (default a quarter of --steps)")
    ] = None,
    seed: Annotated[int, typer.Option(help="noise seed, the same for both runs")] = 0,
    label: Annotated[str, typer.Option(help="the shape to draw, e.g. disc or square")] = "disc",
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 1.0,
    shift: Annotated[
        float | None, typer.Option(help="shift of the sampling schedule (default: the model's)")
    ] = None,
    frames: Annotated[
        int, typer.Option(help="frames (the training clip is in the weights' card)")
    ] = DEFAULT_CLIP[0],
    size: Annotated[int, typer.Option(help="height = width in pixels, even")] = DEFAULT_CLIP[1],
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
    try:
        import torch

        from ..toy import data
        from ..toy.pipeline import DEFAULT_SHIFT, label_of
        from ..toy.sample import dense_and_sparse
        from ..toy.strip import save_animation, side_by_side
        from ..toy.weights import WeightsError, load
    except ImportError as err:
        Console().print(f"[red]error:[/red] tailattn generate needs diffusers ({err})")
        raise typer.Exit(2) from None

    shift = DEFAULT_SHIFT if shift is None else shift
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
                "default" if keep is None else keep,
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
    video = side_by_side(result.dense[0], result.sparse[0])
    name = f"{data.SHAPES[index]}-seed{seed}-{method.replace('+', '_')}"
    written = save_animation(video, out, name)
    console.print(f"dense (left) and sparse (right): {', '.join(str(p) for p in written)}")

"""The ``tailattn`` command: ``study`` (the oracle study), ``bench`` (GPU timings) and
``capture`` (q, k, v of a diffusers pipeline) and ``generate`` (the toy model); the last two need
the ``diffusers`` extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    help="tailattn: sparse attention with tail aggregation for video diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
)


def split_list(text: str | None, name: str, cast=str) -> tuple | None:
    """``"a, b,c"`` -> ``(a, b, c)`` cast to ``cast``; None stays None (BadParameter on junk)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise typer.BadParameter(f"{name} is empty")
    try:
        return tuple(cast(item) for item in items)
    except ValueError:
        raise typer.BadParameter(f"{name} must be a comma-separated list, got {text!r}") from None


def split_methods(text: str | None) -> tuple[str, ...] | None:
    """Method specs separated by commas outside parentheses (``topp(p=0.9)+bins8,topk``)."""
    if text is None:
        return None
    specs, depth, current = [], 0, ""
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            specs.append(current)
            current = ""
        else:
            current += char
    specs.append(current)
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise typer.BadParameter("--methods is empty")
    return tuple(specs)


@app.command()
def study(
    source: Annotated[
        str,
        typer.Option(
            help="synthetic[:PRESET] (small, wan-1.3b-480p, wan-14b-720p), toy, or a capture file"
        ),
    ] = "synthetic",
    methods: Annotated[
        str | None,
        typer.Option(
            help="method specs for table1/recall, e.g. 'topk,topk+uta'; 'paper' and 'seed' "
            "stand for named lists"
        ),
    ] = None,
    keep: Annotated[
        str | None, typer.Option(help="keep ratios, e.g. '0.1,0.2,0.3,0.4,0.5'")
    ] = None,
    experiments: Annotated[
        str | None,
        typer.Option(
            help="table1, recall, bins, ablation, distributions, outputs, anatomy, "
            "steps (default: all that apply)"
        ),
    ] = None,
    heads: Annotated[
        str | None, typer.Option(help="head indices, e.g. '0,3' (default all)")
    ] = None,
    queries: Annotated[
        int | None, typer.Option(help="query rows sampled per head (default all)")
    ] = None,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("reports/study"),
    json_file: Annotated[
        Path | None, typer.Option("--json", help="JSON file (default OUT/study.json)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the synthetic data and the row sampling")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 or float64")] = "float32",
) -> None:
    """Run the oracle study: every method on the same exact logits; Table 1 and the figures."""
    from .study import (
        DEFAULT_KEEPS,
        DEFAULT_METHODS,
        StudyConfig,
        expand_methods,
        run_study,
        table1_rows,
        write_report,
    )

    try:
        config = StudyConfig(
            source=source,
            methods=expand_methods(split_methods(methods) or DEFAULT_METHODS),
            keeps=split_list(keep, "--keep", float) or DEFAULT_KEEPS,
            experiments=split_list(experiments, "--experiments"),
            heads=split_list(heads, "--heads", int),
            queries=queries,
            seed=seed,
            dtype=dtype,
        )
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    console = Console() if sys.stdout.isatty() else Console(width=160)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("study", total=None)

        def advance(label: str, rows: int, total: int) -> None:
            progress.update(task, total=total, advance=rows, description=f"study {label}")

        try:
            result = run_study(config, advance)
        except (ValueError, FileNotFoundError) as err:
            progress.stop()
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from None
    for name, why in result.selected.skipped.items():
        console.print(f"{name}: {why}")
    if "table1" in result.selected.run:
        header, rows = table1_rows(result)
        sampled = f"{result.rows_per_unit} sampled rows" if result.sampled else "all rows"
        table = Table(
            title=f"MSE vs exact attention ({result.source.name}, {len(result.units)} "
            f"heads, {sampled})"
        )
        for column in header:
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    report = write_report(result, out, json_file)
    console.print(f"wrote {report} and {json_file or out / 'study.json'} ({result.seconds:.1f} s)")


@app.command()
def bench(
    shape: Annotated[
        str, typer.Option(help="wan-1.3b-480p, wan-14b-720p or B,H,N,D")
    ] = "wan-1.3b-480p",
    keep: Annotated[str, typer.Option(help="keep ratios")] = "1.0,0.5,0.2,0.1",
    tail: Annotated[str, typer.Option(help="tails of the fused kernel")] = "drop,uta,blocks",
    json_file: Annotated[Path | None, typer.Option("--json", help="write the rows as JSON")] = None,
) -> None:
    """Time dense SDPA, FlexAttention and the tailattn kernels on the GPU (CUDA only)."""
    import torch

    from . import bench as bench_module
    from ._files import write_text_atomic
    from .study.plan import check_keeps

    try:
        parsed = bench_module.parse_shape(shape)
        keeps = tuple(sorted(check_keeps(split_list(keep, "--keep", float)), reverse=True))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    tails = split_list(tail, "--tail")
    console = Console()
    if not torch.cuda.is_available():
        console.print("[red]error:[/red] tailattn bench needs a CUDA GPU; none is available here")
        raise typer.Exit(2)
    rows = bench_module.run(parsed, keeps, tails, progress=console.print)
    console.print(bench_module.to_markdown(rows, f"{shape} on {torch.cuda.get_device_name()}"))
    if json_file is not None:
        write_text_atomic(json_file, json.dumps([r.as_dict() for r in rows], indent=1))


def _register_needing_diffusers(name: str, module: str, attribute: str, summary: str) -> None:
    """Register ``tailattn NAME`` from ``module`` when the diffusers extra is installed, else a
    stub that says what to install."""
    import importlib

    try:
        command = getattr(importlib.import_module(module, __package__), attribute)
    except ImportError as err:
        missing = str(err)

        def unavailable() -> None:
            Console().print(
                f"[red]error:[/red] tailattn {name} needs diffusers: pip install "
                f"'tailattn[diffusers]' ({missing})"
            )
            raise typer.Exit(2)

        unavailable.__doc__ = f"{summary} (needs tailattn[diffusers])."
        settings = {"allow_extra_args": True, "ignore_unknown_options": True}
        app.command(name, context_settings=settings)(unavailable)
        return
    app.command(name)(command)


_register_needing_diffusers(
    "capture", ".integrations.diffusers.cli", "capture_command", "Capture q, k, v of a pipeline"
)
_register_needing_diffusers(
    "generate", ".toy.cli", "generate_command", "Dense vs sparse video from the toy model"
)

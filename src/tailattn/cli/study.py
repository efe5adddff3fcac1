"""``tailattn study``: the oracle study (every method on the same exact logits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .common import console as make_console
from .common import split_list, split_methods


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
            help="method specs for table1/recall, e.g. 'topk,topk+uta'; 'paper', 'peers' and "
            "'errors' stand for named lists"
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
    from .._files import check_writable
    from ..study import (
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
        # the report is written at the end: find out now if it cannot be
        check_writable(out, "the report directory", make_parents=True)
        if json_file is not None:
            check_writable(json_file, "the JSON file")
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    console = make_console()
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

"""``tailattn bench``: speed of dense attention, FlexAttention and the tailattn kernels (CUDA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .common import split_list


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

    from .. import bench as bench_module
    from .._files import write_text_atomic
    from ..study.plan import check_keeps

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

"""``tailattn bench``: speed on the GPU at three levels, each against dense attention in the
same run: ``kernel`` (the fused kernels alone, with FlexAttention on the same mask), ``calls``
(one call through ``tailattn.attention``, every fast method) and ``e2e`` (one transformer step
of Wan2.1-1.3B/14B and a HunyuanVideo-sized model with random weights, eager and compiled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .common import split_list

LEVELS = ("kernel", "calls", "e2e")


def bench(
    level: Annotated[str, typer.Option(help="kernel, calls or e2e")] = "kernel",
    shape: Annotated[
        str, typer.Option(help="kernel/calls: a preset (wan-1.3b-480p, wan-14b-720p) or B,H,N,D")
    ] = "wan-1.3b-480p",
    keep: Annotated[str, typer.Option(help="kernel: keep ratios")] = "1.0,0.5,0.2,0.1",
    tail: Annotated[str, typer.Option(help="kernel: block tails")] = "drop,uta,blocks",
    grid: Annotated[
        str | None, typer.Option(help="calls with B,H,N,D: the grid T,H,W (T*H*W = N)")
    ] = None,
    models: Annotated[
        str, typer.Option(help="e2e: wan-1.3b-480p, wan-14b-720p, hunyuan-544p (comma list)")
    ] = "wan-1.3b-480p",
    modes: Annotated[str, typer.Option(help="e2e: eager, compiled")] = "eager,compiled",
    json_file: Annotated[Path | None, typer.Option("--json", help="write the rows as JSON")] = None,
) -> None:
    """Time dense attention and tailattn on the GPU (CUDA only)."""
    from .._files import check_parent

    if level not in LEVELS:
        raise typer.BadParameter(f"--level must be one of {', '.join(LEVELS)}, got {level!r}")
    if json_file is not None:
        try:
            check_parent(json_file, "JSON file")
        except (OSError, ValueError) as err:
            raise typer.BadParameter(f"--json: {err}") from None
    plan = _plan(level, shape, keep, tail, grid, models, modes)
    import torch

    console = Console()
    if not torch.cuda.is_available():
        console.print("[red]error:[/red] tailattn bench needs a CUDA GPU; none is available here")
        raise typer.Exit(2)
    rows, table = plan(console.print, torch.cuda.get_device_name())
    console.print(table)
    if json_file is not None:
        from .._files import write_text_atomic

        write_text_atomic(json_file, json.dumps([r.as_dict() for r in rows], indent=1))


def _plan(level: str, shape: str, keep: str, tail: str, grid: str | None, models: str, modes: str):
    """Check every option of the level (before any GPU work) and return the run."""
    from .. import bench as bench_module

    try:
        if level == "e2e":
            from ..bench import e2e

            names = split_list(models, "--models")
            unknown = [m for m in names if m not in e2e.MODELS]
            if unknown:
                raise ValueError(f"unknown models {unknown}; known: {', '.join(e2e.MODELS)}")
            chosen = split_list(modes, "--modes")
            if set(chosen) - {"eager", "compiled"}:
                raise ValueError(f"--modes takes eager and compiled, got {modes!r}")

            def run_e2e(say, device):
                rows = [r for m in names for r in e2e.run(m, modes=chosen, progress=say)]
                return rows, e2e.to_markdown(rows, f"one transformer step on {device}")

            return run_e2e
        parsed = bench_module.parse_shape(shape)
        if level == "calls":
            from ..bench import calls
            from ..data.presets import PRESETS

            if grid is not None:
                layout = tuple(split_list(grid, "--grid", int))
            elif shape in PRESETS:
                layout = PRESETS[shape].grid
            else:
                raise ValueError("--grid T,H,W is needed with a B,H,N,D shape")

            def run_calls(say, device):
                rows = calls.run(parsed, layout, progress=say)
                return rows, calls.to_markdown(rows, f"one call, {shape} on {device}")

            return run_calls
        from ..methods import registry
        from ..study.plan import check_keeps

        keeps = tuple(sorted(check_keeps(split_list(keep, "--keep", float)), reverse=True))
        tails = split_list(tail, "--tail")
        known = registry.tails("block")
        unknown = [t for t in tails if t not in known]
        if unknown:
            raise ValueError(f"unknown block tails {unknown}; known: {', '.join(known)}")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None

    def run_kernel(say, device):
        rows = bench_module.run(parsed, keeps, tails, progress=say)
        return rows, bench_module.to_markdown(rows, f"{shape} on {device}")

    return run_kernel

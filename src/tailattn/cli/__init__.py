"""The ``tailattn`` command (the lab's front door): ``study``, ``bench``, ``capture``,
``generate``.

Every command module imports only typer and rich at import time; torch, diffusers and the rest
load inside the command, so ``tailattn --help`` stays fast and commands that need the
``diffusers`` extra say so when run without it.
"""

from __future__ import annotations

import typer

from .bench import bench
from .capture import capture_command
from .common import split_list, split_methods
from .generate import generate_command
from .study import study

app = typer.Typer(
    help="tailattn: sparse attention with tail aggregation for video diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(study)
app.command()(bench)
app.command("capture")(capture_command)
app.command("generate")(generate_command)

__all__ = ["app", "split_list", "split_methods"]

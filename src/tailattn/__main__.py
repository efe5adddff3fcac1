"""``python -m tailattn``: the ``tailattn`` command."""

from .cli import app

app(prog_name="tailattn")

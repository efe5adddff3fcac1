"""Helpers shared by the ``tailattn`` commands: comma-separated options, the console."""

from __future__ import annotations

import sys

import typer
from rich.console import Console


def console() -> Console:
    """A console for command output; wide when the output is not a terminal (logs, pipes)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


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

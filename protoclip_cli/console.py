"""The shared rich console: every stage prints through it (stderr for progress, stdout for results)."""

from __future__ import annotations

import os

from rich.console import Console

# Results (tables) go to stdout so they can be piped; progress and notices go to stderr.
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun); other ranks stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    if is_main_process():
        console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def progress(**kwargs):
    """A rich Progress with the columns every long stage uses (rate, elapsed, ETA)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not is_main_process() or kwargs.pop("disable", False),
        transient=kwargs.pop("transient", False),
        **kwargs,
    )

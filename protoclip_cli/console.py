"""The shared rich console: every stage prints through it (stderr for progress, stdout for results)."""

from __future__ import annotations

import os
from typing import IO

from rich.console import Console

# Results (tables) go to stdout so they can be piped; progress and notices go to stderr.
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun); other ranks stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str, soft_wrap: bool = False) -> None:
    """A notice on stderr (rank 0); ``soft_wrap`` keeps a long line (a path) unbroken."""
    if is_main_process():
        console.print(message, soft_wrap=soft_wrap)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def progress(*, file: IO[str] | None = None, **kwargs):
    """A rich Progress with the columns every long stage uses (rate, elapsed, ETA).

    It draws on the shared stderr console, or on ``file`` when given (a stage that redirects the
    process's stderr, such as the img2dataset download, passes the stream the terminal is on).
    """
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
        console=console if file is None else Console(file=file, highlight=False),
        disable=not is_main_process() or kwargs.pop("disable", False),
        transient=kwargs.pop("transient", False),
        **kwargs,
    )

"""Options shared by every command, and the error handling every command is wrapped in."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.markup import escape

from protoclip_cli.workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV, Workspace

WorkspaceOption = typer.Option(
    None,
    "--workspace",
    "-w",
    envvar=WORKSPACE_ENV,
    help=f"Workspace folder holding datasets/ and runs/ (default: ./{DEFAULT_WORKSPACE}).",
    show_default=False,
)

SetOption = typer.Option(
    None,
    "--set",
    help="Override a recipe field, e.g. --set optim.lr=1e-4 (repeatable).",
)


def workspace(path: Optional[Path]) -> Workspace:
    return Workspace.at(path)


def handle_errors(command: Callable) -> Callable:
    """Turn a ProtoclipError into one red sentence on stderr and exit status 1 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from protoclip_cli.errors import ProtoclipError

        try:
            return command(*args, **kwargs)
        except ProtoclipError as exc:
            from protoclip_cli.console import console

            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


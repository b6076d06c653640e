"""Options shared by every command, and the error handling every command is wrapped in."""

from __future__ import annotations

import functools
import inspect
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
    """Turn a ProtoclipError, an OSError or Ctrl-C into one red sentence on stderr and an exit
    status (1; 130 after Ctrl-C), with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from protoclip_cli.errors import Interrupted, ProtoclipError, Refused, os_error_sentence

        try:
            return command(*args, **kwargs)
        except Refused as exc:
            if not _under_torchrun():
                _say(str(exc))
                raise typer.Exit(exc.exit_code) from None
            # Every rank refuses alike: rank 0 says it once. The status stays non-zero, so a job
            # script sees the failure; torchrun then adds its own summary of the failed ranks.
            from protoclip_cli.console import is_main_process

            if is_main_process():
                _say(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except ProtoclipError as exc:
            _say(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # A write or read the stages do not wrap themselves (an append, a folder being made).
            _say(os_error_sentence(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _say("Interrupted by Ctrl-C; files are written whole or not at all, so rerunning the same command is safe.")
            raise typer.Exit(Interrupted.exit_code) from None

    wrapper.__doc__ = help_paragraphs(command.__doc__)
    return wrapper


def help_paragraphs(doc: str | None) -> str | None:
    """A command's docstring as ``--help`` shows it: each paragraph of prose on one line (the help
    wraps it to the terminal), indented lines (examples) kept as they are."""
    if not doc:
        return doc
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    for line in lines:
        joinable = line.strip() and not line.startswith(" ") and out and out[-1].strip() and not out[-1].startswith(" ")
        if joinable and not out[-1].startswith("protoclip ") and not line.startswith("protoclip "):
            out[-1] = f"{out[-1]} {line}"
        else:
            out.append(line)
    return "\n".join(out)


def _under_torchrun() -> bool:
    from protoclip_cli.core.distributed import launched_by_torchrun

    return launched_by_torchrun()


def _say(sentence: str) -> None:
    from protoclip_cli.console import console

    console.print(f"[red]error:[/red] {escape(sentence)}", soft_wrap=True)

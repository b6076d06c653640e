"""The ``protoclip`` command line: one module per command, heavy imports inside the commands.

Every command turns a :class:`~protoclip_cli.errors.ProtoclipError` into one red sentence on
stderr and exit status 1.
"""

from __future__ import annotations

import sys

import typer

from protoclip_cli import __version__
from protoclip_cli.cli import cluster, demo, download, evaluate, export, teacher, train

app = typer.Typer(
    name="protoclip",
    help=(
        "Pretrain CLIP-style image-text models with ProtoCLIP and evaluate them.\n\n"
        "Stages talk through artifacts in a workspace folder: download -> teacher-embed -> train -> "
        "cluster / evaluate / export. `protoclip demo` runs them all on the embedded data set."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("download")(download.command)
app.command("teacher-embed")(teacher.command)
app.command("train")(train.command)
app.command("cluster")(cluster.command)
app.command("evaluate")(evaluate.command)
app.command("export")(export.command)
app.command("demo")(demo.command)


def _version(value: bool) -> None:
    if value:
        print(f"protoclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def main() -> None:
    from protoclip_cli.errors import ProtoclipError

    try:
        rc = app(standalone_mode=False)
    except ProtoclipError as exc:
        from protoclip_cli.console import console

        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)

"""The ``protoclip`` command line: one module per command, heavy imports inside the commands.

Every command is wrapped by :func:`~protoclip_cli.cli.common.handle_errors`, which turns a
:class:`~protoclip_cli.errors.ProtoclipError` into one red sentence on stderr and exit status 1.
"""

from __future__ import annotations

import typer

from protoclip_cli import __version__
from protoclip_cli.cli.common import handle_errors
from protoclip_cli.cli import cluster, compare, demo, download, evaluate, export, recipes, teacher, train

app = typer.Typer(
    name="protoclip",
    help=(
        "Pretrain CLIP-style image-text models with ProtoCLIP and evaluate them.\n\n"
        "Stages talk through artifacts in a workspace folder: download -> teacher-embed -> train -> "
        "cluster / evaluate / export. `protoclip demo` runs them all on the embedded data set; "
        "`protoclip compare` trains CLIP, ProtoCLIP and its ablations over seeds and tables them."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("download")(handle_errors(download.command))
app.command("teacher-embed")(handle_errors(teacher.command))
app.command("train")(handle_errors(train.command))
app.command("cluster")(handle_errors(cluster.command))
app.command("evaluate")(handle_errors(evaluate.command))
app.command("export")(handle_errors(export.command))
app.command("compare")(handle_errors(compare.command))
app.command("demo")(handle_errors(demo.command))
app.add_typer(recipes.app, name="recipes")
for recipe_command in recipes.app.registered_commands:
    recipe_command.callback = handle_errors(recipe_command.callback)
recipes.app.registered_callback.callback = handle_errors(recipes.app.registered_callback.callback)


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
    app()

"""`protoclip recipes`: the recipes shipped with protoclip: list, show and copy them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="The recipes shipped with protoclip: list them, print one, or copy one to edit.\n\n"
    "`protoclip train NAME` trains a shipped recipe by name; `protoclip train FILE` trains your copy.",
    no_args_is_help=False,
    invoke_without_command=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def list_recipes(context: typer.Context) -> None:
    """List the shipped recipes with a line on each."""
    if context.invoked_subcommand is not None:
        return
    from rich.table import Table

    from protoclip_cli.configs import recipes
    from protoclip_cli.console import out

    table = Table(title="Shipped recipes (`protoclip recipes show NAME`, `protoclip train NAME`)")
    table.add_column("name")
    table.add_column("what", overflow="fold")
    for name in recipes.names():
        table.add_row(name, recipes.description(name))
    out.print(table)


@app.command("show")
def show(name: str = typer.Argument(..., help="Recipe name, e.g. cc3m.")) -> None:
    """Print a shipped recipe's TOML.

    Example:

      protoclip recipes show synthetic
    """
    from protoclip_cli.configs import recipes

    print(recipes.path(name).read_text(), end="")


@app.command("copy")
def copy(
    name: str = typer.Argument(..., help="Recipe name, e.g. cc3m."),
    destination: Optional[Path] = typer.Argument(None, help="File or folder to write ('' = ./NAME.toml).", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write an editable copy of a shipped recipe, then train it with `protoclip train FILE`.

    Examples:

      protoclip recipes copy cc3m

      protoclip recipes copy cc3m my-runs/cc3m-lr1e-4.toml
    """
    from protoclip_cli.artifacts import write_text
    from protoclip_cli.configs import recipes
    from protoclip_cli.console import info
    from protoclip_cli.errors import ProtoclipError

    source = recipes.path(name)
    target = destination if destination is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise ProtoclipError(f"{target} exists; pass --force to replace it, or name another file.")
    write_text(target, source.read_text())
    info(f"Wrote {target}; edit it, then `protoclip train {target}`.")

"""The recipes shipped with the package (``protoclip_cli/recipes/*.toml``, package data), found by name.

``protoclip train cc3m`` trains the shipped ``cc3m.toml``; ``protoclip recipes`` lists them with the
first line of each file's header comment, ``recipes show NAME`` prints one and ``recipes copy NAME
[PATH]`` writes an editable copy. A checkout has a ``recipes`` link to the same folder, so
``protoclip train recipes/cc3m.toml`` works there as a file path.
"""

from __future__ import annotations

from pathlib import Path

from protoclip_cli.errors import MissingInputError

FOLDER = Path(__file__).resolve().parents[1] / "recipes"


def names() -> list[str]:
    """The shipped recipes' names (file names without ``.toml``), sorted."""
    return sorted(p.stem for p in FOLDER.glob("*.toml"))


def path(name: str) -> Path:
    """The shipped recipe ``name`` (``cc3m`` or ``cc3m.toml``)."""
    stem = name.removesuffix(".toml")
    found = FOLDER / f"{stem}.toml"
    if "/" in stem or not found.is_file():
        raise MissingInputError(f"No recipe named '{name}'; the shipped recipes are {', '.join(names())} "
                                "(`protoclip recipes` lists them).")
    return found


def description(name: str) -> str:
    """The first line of the recipe's header comment."""
    for line in path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve(target: str | Path) -> Path:
    """A recipe file as the user named it: an existing file, a shipped recipe's name, or
    ``recipes/<name>.toml`` of a checkout when run from elsewhere (the shipped one)."""
    given = Path(target)
    if given.is_file():
        return given
    if given.exists():
        raise MissingInputError(f"Recipe {given} is a folder; pass a .toml file or a recipe name (`protoclip recipes`).")
    stem = given.name.removesuffix(".toml")
    if (len(given.parts) == 1 or given.parent.name == "recipes") and stem in names():
        return FOLDER / f"{stem}.toml"
    raise MissingInputError(
        f"Recipe {target} is neither a file nor the name of a shipped recipe ({', '.join(names())}); "
        "`protoclip recipes copy NAME` writes an editable copy of one."
    )

"""`protoclip evaluate`."""

from __future__ import annotations

from protoclip_cli.cli.common import not_built


def command() -> None:
    """Not built yet."""
    not_built("evaluate")

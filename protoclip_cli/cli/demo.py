"""`protoclip demo`: the whole pipeline on the embedded data set, ending with a results table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def command(
    workspace: Optional[Path] = WorkspaceOption,
    baseline: bool = typer.Option(
        True, "--baseline/--no-baseline", help="Also train the CLIP baseline recipe and compare it with ProtoCLIP."
    ),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Override a field of both training recipes, e.g. --set schedule.episodes=2 (repeatable)."
    ),
) -> None:
    """Run download, teacher-embed, train and evaluate on the embedded data set, then print the results.

    Each stage is the same code the stand-alone commands run, and leaves its artifacts in the
    workspace; a rerun reuses what is already there (finished downloads, teacher files and runs).

    Examples:

      protoclip demo

      protoclip demo --no-baseline --set schedule.episodes=2 --workspace /tmp/demo
    """
    from protoclip_cli.stages import demo

    demo.run(RECIPES, workspace, baseline=baseline, overrides=tuple(set_ or ()))

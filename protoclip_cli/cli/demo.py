"""`protoclip demo`: the whole pipeline on the embedded data set, ending with a results table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption


def command(
    workspace: Optional[Path] = WorkspaceOption,
    baseline: bool = typer.Option(
        True, "--baseline/--no-baseline", help="Also train the CLIP baseline recipe and compare it with ProtoCLIP."
    ),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Override a field of both training recipes, e.g. --set schedule.episodes=2 (repeatable)."
    ),
    train_size: Optional[int] = typer.Option(
        None, "--train-size", help="Training scenes of the embedded set (default 4096); fewer for a quicker look.",
        show_default=False,
    ),
    heldout_size: Optional[int] = typer.Option(
        None, "--heldout-size", help="Held-out scenes of the embedded set (default 1024).", show_default=False
    ),
) -> None:
    """Run download, teacher-embed, train and evaluate on the embedded data set, then print the results.

    Each stage is the same code the stand-alone commands run, and leaves its artifacts in the
    workspace; a rerun reuses what is already there (finished downloads, teacher files and runs).

    Examples:

      protoclip demo

      protoclip demo --no-baseline --set schedule.episodes=2 --workspace /tmp/demo

      protoclip demo --train-size 1024 --heldout-size 256 --set data.episode_size=256 --workspace /tmp/small
    """
    from protoclip_cli.stages import demo

    demo.run(workspace, baseline=baseline, overrides=tuple(set_ or ()), train_size=train_size, heldout_size=heldout_size)

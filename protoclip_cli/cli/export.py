"""`protoclip export`: a run's CLIP towers as an OpenCLIP checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption, workspace


def command(
    run: Optional[str] = typer.Argument(
        None, help="Run name, run folder or checkpoint file (default: the workspace's latest run).", show_default=False
    ),
    format: str = typer.Option("open_clip", "--format", help="Export format (open_clip)."),
    out: str = typer.Option("", "--out", "-o", help="Output file (default: runs/<run>/export/<run>-<arch>.pt).", show_default=False),
    checkpoint: str = typer.Option("", "--checkpoint", help="Checkpoint to export (default: the run's latest).", show_default=False),
    workspace_path: Optional[Path] = WorkspaceOption,
) -> None:
    """Write a checkpoint that open_clip.create_model_and_transforms(ARCH, pretrained=FILE) loads."""
    from protoclip_cli.console import info, out as stdout
    from protoclip_cli.stages.export import run as export

    from protoclip_cli.stages.export import ExportConfig

    manifest = export(ExportConfig(run=run or "", checkpoint=checkpoint, format=format, out=out), workspace(workspace_path))
    stdout.print(manifest["file"], soft_wrap=True)
    info(f"Exported {manifest['arch']} (episode {manifest['episode']}, step {manifest['global_step']}); "
         f"open_clip gives the same embeddings (max |difference| {manifest['round_trip_max_abs_difference']:.1e}).")
    if manifest["needs_registration"]:
        info("Register this package's tiny configs before loading it: "
             "`from protoclip_cli.core.model import register_tiny_configs; register_tiny_configs()`.")
    info(f"Load it with {manifest['load_with']}.")

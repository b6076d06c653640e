"""`protoclip export`: a run's CLIP towers as an OpenCLIP checkpoint."""

from __future__ import annotations

from typing import Any

from protoclip_cli.cli.common import workspace
from protoclip_cli.cli.options import Flag, build_config, stage_command
from protoclip_cli.stages.export import ExportConfig


def run(values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    from protoclip_cli.console import info, out as stdout
    from protoclip_cli.stages.export import run as export

    manifest = export(build_config(ExportConfig, values, overrides), workspace(workspace_path))
    stdout.print(manifest["file"], soft_wrap=True)
    info(f"Exported {manifest['arch']} (episode {manifest['episode']}, step {manifest['global_step']}); "
         f"open_clip gives the same embeddings (max |difference| {manifest['round_trip_max_abs_difference']:.1e}).")
    if manifest["needs_registration"]:
        info("Register this package's tiny configs before loading it: "
             "`from protoclip_cli.core.model import register_tiny_configs; register_tiny_configs()`.")
    info(f"Load it with {manifest['load_with']}.")


command = stage_command(
    ExportConfig,
    run,
    flags={"run": Flag(argument=True), "out": Flag(("--out", "-o"))},
    doc="""Write a checkpoint that open_clip.create_model_and_transforms(ARCH, pretrained=FILE) loads.

    Example:

      protoclip export synthetic-protoclip --format open_clip --out tiny.pt
    """,
)

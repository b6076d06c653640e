"""`protoclip export`: a run's CLIP towers as an OpenCLIP checkpoint or an OpenCLIP hub folder."""

from __future__ import annotations

from typing import Any

from protoclip_cli.cli.common import workspace
from protoclip_cli.cli.options import Flag, build_config, stage_command
from protoclip_cli.configs.export import ExportConfig


def run(values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    from protoclip_cli.console import info
    from protoclip_cli.console import out as stdout
    from protoclip_cli.stages.export import run as export

    manifest = export(build_config(ExportConfig, values, overrides), workspace(workspace_path))
    stdout.print(manifest["file"], soft_wrap=True)
    info(f"Exported {manifest['arch']} (episode {manifest['episode']}, step {manifest['global_step']}); "
         f"open_clip gives the same embeddings (max |difference| {manifest['round_trip_max_abs_difference']:.1e}).")
    if manifest["format"] == "hf":
        results = manifest["results_in_card"]
        info(f"Model card: {len(results)} evaluation result(s) of this checkpoint"
             + (f" ({', '.join(results)})." if results else "; `protoclip evaluate` records them."))
    if manifest["needs_registration"]:
        info("Register this package's tiny configs before loading it: "
             "`from protoclip_cli.core.model import register_tiny_configs; register_tiny_configs()`.")
    info(f"Load it with {manifest['load_with']}.")
    if manifest.get("pushed_to"):
        info(f"Pushed to the Hugging Face Hub: {manifest['pushed_to']}")


command = stage_command(
    ExportConfig,
    run,
    flags={"run": Flag(argument=True), "out": Flag(("--out", "-o"))},
    doc="""Write an OpenCLIP checkpoint (--format open_clip) or hub folder (--format hf) of a run.

    open_clip.create_model_and_transforms(ARCH, pretrained=FILE) loads the checkpoint;
    open_clip.create_model_and_transforms("local-dir:DIR") loads the hub folder (config, safetensors
    weights, a model card with the recipe and the run's evaluation results). --push USER/NAME uploads
    the folder to the Hugging Face Hub.

    Examples:

      protoclip export synthetic-protoclip --format open_clip --out tiny.pt

      protoclip export synthetic-protoclip --format hf --out tiny-hf

      protoclip export cc3m-protoclip --format hf --push me/cc3m-protoclip-rn50 --license apache-2.0
    """,
)

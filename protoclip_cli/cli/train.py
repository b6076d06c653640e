"""`protoclip train`: episodic ProtoCLIP or the CLIP baseline from a TOML recipe."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from protoclip_cli.cli.common import SetOption, WorkspaceOption, workspace


def command(
    recipe: Optional[str] = typer.Argument(
        None,
        help="TOML recipe file (recipes/synthetic.toml) or the name of a shipped recipe (synthetic, cc3m; "
        "`protoclip recipes` lists them). Fields: `protoclip train --explain`.",
        show_default=False,
    ),
    overrides: Optional[List[str]] = SetOption,
    resume: Optional[bool] = typer.Option(
        None,
        "--resume/--no-resume",
        help="Continue from the run's latest checkpoint / start over (default: resume when a checkpoint of this recipe exists).",
        show_default=False,
    ),
    explain: bool = typer.Option(False, "--explain", help="Print every recipe field (resolved value, help) and exit."),
    trust_teacher: bool = typer.Option(
        False,
        "--trust-teacher",
        help="Use the teacher file even though it was embedded from another version of the data set (its manifest "
        "changed); only when you know the captions are the same. Its coverage of the samples is still checked.",
    ),
    workspace_path: Optional[Path] = WorkspaceOption,
) -> None:
    """Train ProtoCLIP or the CLIP baseline from a TOML recipe; rerunning the command resumes it.

    Change any recipe field with --set; `protoclip train --explain` lists them.

    Examples:

      protoclip train recipes/synthetic.toml

      protoclip train cc3m --set optim.lr=1e-4 --set name=cc3m-lr1e-4

      torchrun --nproc_per_node 8 -m protoclip_cli train recipes/cc3m-8gpu.toml
    """
    from protoclip_cli import config as config_io
    from protoclip_cli.configs import recipes
    from protoclip_cli.configs.train import TrainConfig
    from protoclip_cli.console import console, out
    from protoclip_cli.errors import ProtoclipError

    if recipe is None and not explain:
        raise ProtoclipError("Name a recipe, e.g. `protoclip train synthetic` or `protoclip train recipes/synthetic.toml` "
                             "(fields: `protoclip train --explain`).")
    config = (
        config_io.load(TrainConfig, recipes.resolve(recipe), overrides or [])
        if recipe is not None
        else config_io.from_dict(TrainConfig, config_io.apply_overrides({}, overrides or []), "--set")
    )
    if explain:
        _print_explain(config)
        return

    from protoclip_cli.console import is_main_process
    from protoclip_cli.stages.train import run

    manifest = run(config, workspace(workspace_path), resume=resume, trust_teacher=trust_teacher)
    if is_main_process():
        broken = int(manifest.get("broken_samples") or 0)
        short = manifest.get("short_shards") or {}
        skipped = (f" Broken samples were skipped {broken} time(s)" if broken else "") + (
            f"{',' if broken else ''} {int(manifest.get('lost_samples') or 0)} samples were lost to {len(short)} "
            f"shard(s) that end early ({', '.join(f'{s} after {r} of its {h}' for s, (r, h) in sorted(short.items()))})"
            if short else ""
        )
        if broken or short:
            skipped += (f" (metrics.jsonl counts them per episode); `protoclip download {config.data.dataset} --verify` "
                        "repairs the data set.")
        console.print(f"[green]done:[/green] run '{config.name}' finished at step {manifest.get('global_step')}.{skipped}")
        out.print(manifest.get("final_checkpoint", ""), soft_wrap=True)


def _print_explain(config) -> None:
    from rich.table import Table

    from protoclip_cli import config as config_io
    from protoclip_cli.configs.train import TrainConfig
    from protoclip_cli.console import out

    values = config_io.to_dict(config)
    table = Table(title="Recipe fields (protoclip_cli.configs.train.TrainConfig)")
    for column in ("key", "type", "value", "default", "help"):
        table.add_column(column, overflow="fold")
    for key, type_name, default, help_text in config_io.explain(TrainConfig):
        node = values
        for part in key.split("."):
            node = node.get(part, "") if isinstance(node, dict) else ""
        table.add_row(key, type_name, repr(node), default, help_text)
    out.print(table)

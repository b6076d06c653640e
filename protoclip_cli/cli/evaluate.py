"""`protoclip evaluate`: zero-shot, linear probe, retrieval, clustering and modality gap."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from protoclip_cli.cli.common import workspace
from protoclip_cli.cli.options import Flag, build_config, stage_command
from protoclip_cli.configs.evaluate import EvaluateConfig

IMAGENET_ROOT = inspect.Parameter(
    "imagenet_root", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
    default=typer.Option(None, "--imagenet-root", help="ImageNet folder holding train/ and val/<wnid>/ "
                         "(the same as --dataset imagenet --root DIR).", show_default=False),
)  # fmt: skip


def run(values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    from protoclip_cli.stages.evaluate import run as evaluate

    imagenet_root = values.pop("imagenet_root")
    if imagenet_root:
        if values["dataset"] not in (None, "", "imagenet") or values["root"]:
            from protoclip_cli.errors import ProtoclipError

            raise ProtoclipError("--imagenet-root selects ImageNet; do not combine it with --dataset or --root.")
        task = values["task"] or ""
        values["dataset"] = "" if task.startswith("imagenet-") else "imagenet"
        values["root"] = imagenet_root
    manifest = evaluate(build_config(EvaluateConfig, values, overrides), workspace(workspace_path))
    print_results(manifest["written"])


def print_results(written: dict[str, dict]) -> None:
    from rich.table import Table

    from protoclip_cli.console import info, out

    table = Table(title="Evaluation")
    for column in ("result", "data", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, record in written.items():
        for i, (metric, value) in enumerate(record["metrics"].items()):
            table.add_row(name if i == 0 else "", record["dataset"] if i == 0 else "", metric, f"{value:.4f}")
    out.print(table)
    for record in written.values():
        info(f"wrote {record['path']}", soft_wrap=True)
        for plot in record.get("plots", []):
            info(f"plot {plot}", soft_wrap=True)
    folders = sorted({str(Path(p).parent) for record in written.values() for p in record.get("clip_benchmark", [])})
    for folder in folders:
        info(f"CLIP_benchmark records in {folder} (`clip_benchmark build {folder}` makes their CSV)", soft_wrap=True)


command = stage_command(
    EvaluateConfig,
    run,
    flags={
        "model": Flag(argument=True),
        "task": Flag(("--task", "-t")),
        "dataset": Flag(("--dataset", "-d")),
        "out": Flag(("--out", "-o")),
        "cache": Flag(("--cache/--no-cache",)),
    },
    extra=(IMAGENET_ROOT,),
    doc="""Evaluate a run of this project (or an OpenCLIP checkpoint) and print the results.

    Examples:

      protoclip evaluate --task all

      protoclip evaluate protoclip-workspace/runs/synthetic-protoclip --task zeroshot

      protoclip evaluate cc3m-protoclip --task imagenet-zeroshot --imagenet-root /data/imagenet

      protoclip evaluate cc3m-protoclip --task zeroshot-suite --root /data/zeroshot

    Each result is a JSON (and a CLIP_benchmark record) with its PNG plots next to it.
    """,
)

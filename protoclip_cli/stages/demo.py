"""The demo: every stage on the embedded data set, ProtoCLIP next to the CLIP baseline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from protoclip_cli import config as config_io
from protoclip_cli.console import console, out
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.recipes import TrainConfig
from protoclip_cli.workspace import Workspace

DATASET = "synthetic"


def _recipe(recipes: Path, name: str, overrides: tuple[str, ...]) -> TrainConfig:
    path = recipes / name
    if not path.is_file():
        raise ProtoclipError(
            f"The demo recipe {path} is missing; run the demo from a checkout of protoclip (make demo)."
        )
    return config_io.load(TrainConfig, path, overrides)


def _step(title: str) -> None:
    console.rule(f"[bold]{title}")


def run(recipes: Path, workspace_path: Path | None, *, baseline: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Download, embed, train (ProtoCLIP and optionally CLIP) and evaluate; returns results by run."""
    from protoclip_cli.stages import download, evaluate, teacher_embed, train

    workspace = Workspace.at(workspace_path)
    recipe_files = ["synthetic.toml"] + (["synthetic-clip.toml"] if baseline else [])
    configs = [_recipe(recipes, name, overrides) for name in recipe_files]
    timings: dict[str, float] = {}

    start = time.perf_counter()
    _step("1. download: the embedded data set through img2dataset")
    download.run(download.make_config(DATASET, "synthetic"), workspace)
    timings["download"] = time.perf_counter() - start

    start = time.perf_counter()
    _step("2. teacher-embed: caption features of all-MiniLM-L6-v2")
    teacher_embed.run(teacher_embed.TeacherConfig(dataset=DATASET), workspace)
    timings["teacher-embed"] = time.perf_counter() - start

    results: dict[str, dict[str, float]] = {}
    for config in configs:
        start = time.perf_counter()
        _step(f"3. train: {config.name}")
        train.run(config, workspace)
        timings[f"train {config.name}"] = time.perf_counter() - start

        start = time.perf_counter()
        _step(f"4. evaluate: {config.name} on the held-out split")
        manifest = evaluate.run(evaluate.EvaluateConfig(task="all", model=config.name), workspace)
        timings[f"evaluate {config.name}"] = time.perf_counter() - start
        results[config.name] = {
            f"{name}: {metric}": value
            for name, record in manifest["written"].items()
            for metric, value in record["metrics"].items()
            if isinstance(value, (int, float))
        }

    _print(results, timings, workspace)
    return results


def _print(results: dict[str, dict[str, float]], timings: dict[str, float], workspace: Workspace) -> None:
    from rich.table import Table

    runs = list(results)
    table = Table(title=f"Held-out results on the embedded data set ({workspace.root}/runs)")
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    compared = len(runs) == 2
    if compared:  # ProtoCLIP first, its CLIP baseline second
        table.add_column(f"{runs[0]} - {runs[1]}", justify="right")
    for metric in results[runs[0]]:
        values = [results[r].get(metric, float("nan")) for r in runs]
        table.add_row(metric, *(f"{v:.4f}" for v in values), *([f"{values[0] - values[1]:+.4f}"] if compared else []))
    out.print(table)
    if compared:
        out.print(
            "One seed each: a difference of a point or two is within the seed noise. "
            "docs/results.md has the comparison over seeds (`protoclip compare`)."
        )
    times = Table(title="Time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        times.add_row(stage, f"{seconds:.1f}")
    out.print(times)

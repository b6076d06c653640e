"""The demo: every stage on the embedded data set, ProtoCLIP next to the CLIP baseline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from protoclip_cli import config as config_io
from protoclip_cli.configs import recipes
from protoclip_cli.configs.download import make_config
from protoclip_cli.configs.evaluate import EvaluateConfig
from protoclip_cli.configs.teacher import TeacherConfig
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.console import console, out
from protoclip_cli.stages import download, evaluate, teacher_embed, train
from protoclip_cli.workspace import Workspace

DATASET = "synthetic"
RECIPES = ("synthetic", "synthetic-clip")  # ProtoCLIP, then its CLIP baseline
# The table's rows: (result, metric, label); the rest of each task's metrics are in its eval/*.json.
ROWS = (
    ("zeroshot", "top1", "zero-shot top-1 %"), ("zeroshot", "top5", "zero-shot top-5 %"),
    ("linear-probe", "top1", "linear probe top-1 %"), ("retrieval", "mean_recall", "retrieval mean recall %"),
    ("clustering", "ari", "clustering ARI"), ("clustering", "ami", "clustering AMI"),
    ("modality-gap", "gap", "modality gap"),
)  # fmt: skip
RESULTS_PAGE = "docs/results.md"


def _step(title: str) -> None:
    console.rule(f"[bold]{title}")


def run(workspace_path: Path | None, *, baseline: bool = True, overrides: tuple[str, ...] = (),
        train_size: int | None = None, heldout_size: int | None = None) -> dict[str, Any]:
    """Download, embed, train (ProtoCLIP and optionally CLIP) and evaluate; returns results by run.
    ``train_size`` / ``heldout_size``: a smaller embedded set than the download's default."""
    workspace = Workspace.at(workspace_path)
    names = RECIPES if baseline else RECIPES[:1]
    configs = [config_io.load(TrainConfig, recipes.path(name), overrides) for name in names]
    timings: dict[str, float] = {}

    start = time.perf_counter()
    _step("1. download: the embedded data set through img2dataset")
    download.run(make_config(DATASET, "synthetic", synthetic_train_size=train_size, synthetic_heldout_size=heldout_size),
                 workspace)
    timings["download"] = time.perf_counter() - start

    start = time.perf_counter()
    _step("2. teacher-embed: caption features of all-MiniLM-L6-v2")
    teacher_embed.run(TeacherConfig(dataset=DATASET), workspace)
    timings["teacher-embed"] = time.perf_counter() - start

    results: dict[str, dict[str, dict]] = {}
    for config in configs:
        start = time.perf_counter()
        _step(f"3. train: {config.name}")
        train.run(config, workspace)
        timings[f"train {config.name}"] = time.perf_counter() - start

        start = time.perf_counter()
        _step(f"4. evaluate: {config.name} on the held-out split")
        manifest = evaluate.run(EvaluateConfig(task="all", model=config.name), workspace)
        timings[f"evaluate {config.name}"] = time.perf_counter() - start
        results[config.name] = {record["task"]: record for record in manifest["written"].values()}

    _print(results, configs, timings, workspace)
    return results


def _print(results: dict[str, dict[str, dict]], configs: list[TrainConfig], timings: dict[str, float],
           workspace: Workspace) -> None:
    runs = list(results)
    compared = len(runs) == 2
    table = Table(title=f"Held-out results, {workspace.root}/runs", title_justify="left")
    table.add_column("metric")
    for name in runs:  # ProtoCLIP first, its CLIP baseline second
        table.add_column("ProtoCLIP" if name == configs[0].name else "CLIP", justify="right")
    if compared:
        table.add_column("difference", justify="right")
    for task, metric, label in ROWS:
        values = [results[r][task]["metrics"].get(metric, float("nan")) for r in runs]
        digits = 2 if "%" in label else 3
        table.add_row(label, *(f"{v:.{digits}f}" for v in values), *([f"{values[0] - values[1]:+.{digits}f}"] if compared else []))
    out.print(table)
    zeroshot = results[runs[0]]["zeroshot"]
    out.print(
        f"{' and '.join('ProtoCLIP' if c is configs[0] else 'CLIP' for c in configs)}, one seed each; the comparison "
        f"over seeds is in {RESULTS_PAGE}. Chance: "
        f"{zeroshot['chance_top1']:.1f}% top-1 ({zeroshot['classes']} classes). Your own data: `protoclip download NAME "
        "--url-list FILE`, `protoclip teacher-embed NAME`, `protoclip train synthetic --set data.dataset=NAME`."
    )
    times = Table(title="Time per stage", title_justify="left")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        times.add_row(stage, f"{seconds:.1f}")
    out.print(times)

"""`protoclip evaluate`: zero-shot, linear probe, retrieval, clustering and modality gap."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption, workspace


def command(
    model: Optional[str] = typer.Argument(
        None, help="Run name, run folder or checkpoint file (default: the workspace's latest run).", show_default=False
    ),
    task: str = typer.Option(
        "all", "--task", "-t",
        help="zeroshot, linear-probe, retrieval, clustering, modality-gap, all, or a preset "
        "<dataset>-<task> (imagenet-zeroshot, cifar10-zeroshot, coco-retrieval, synthetic-zeroshot).",
    ),
    dataset: str = typer.Option(
        "", "--dataset", "-d",
        help="imagenet, cifar10, cifar100, stl10, coco, flickr30k, folder, webdataset, or a workspace data set "
        "(default: the run's training data set, held-out split).", show_default=False,
    ),
    root: str = typer.Option("", "--root", help="Folder of the data set (a glob of .tar shards for webdataset).", show_default=False),
    imagenet_root: str = typer.Option("", "--imagenet-root", help="ImageNet folder holding train/ and val/<wnid>/.", show_default=False),
    classnames: str = typer.Option("", "--classnames", help="Class names of an ImageFolder, one per line in sorted folder order.", show_default=False),
    templates: str = typer.Option("", "--templates", help="Prompt templates, one per line with '{}'.", show_default=False),
    captions: str = typer.Option("", "--captions", help="COCO captions JSON or Flickr30k Karpathy split file.", show_default=False),
    split: str = typer.Option("test", "--split", help="Flickr30k Karpathy split."),
    checkpoint: str = typer.Option("", "--checkpoint", help="A checkpoint of the run (default: its latest).", show_default=False),
    open_clip_arch: str = typer.Option("", "--open-clip", help="Evaluate this OpenCLIP architecture (with --pretrained).", show_default=False),
    pretrained: str = typer.Option("", "--pretrained", help="OpenCLIP checkpoint file for --open-clip.", show_default=False),
    out: str = typer.Option("", "--out", "-o", help="Result JSON (a folder with --task all) (default: <run>/eval/).", show_default=False),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per extraction batch."),
    workers: int = typer.Option(2, "--workers", help="Image-decoding worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    clusters: int = typer.Option(0, "--clusters", help="k of the clustering task (default: number of classes).", show_default=False),
    probe_method: str = typer.Option("lbfgs", "--probe-method", help="Linear-probe optimiser: lbfgs or adam."),
    protocol: str = typer.Option(
        "default", "--protocol",
        help="Linear probe and clustering: default (validated L-BFGS probe on normalised features; k-means 50 "
        "iterations x 3 restarts) or reference (the ProtoCLIP reference's: SGD 100 epochs on raw features, best "
        "test top-1; faiss k-means 100 x 5), to compare with the paper. Results: <task>-reference.json.",
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not reuse or store extracted features."),
    workspace_path: Optional[Path] = WorkspaceOption,
) -> None:
    """Evaluate a run of this project (or an OpenCLIP checkpoint) and print the results.

    Examples:

      protoclip evaluate --task all

      protoclip evaluate cc3m-protoclip --task zeroshot --dataset cifar100 --root /data/cifar

      protoclip evaluate cc3m-protoclip --task linear-probe --dataset cifar10 --root /data/cifar --protocol reference
    """
    from protoclip_cli.stages.evaluate import EvaluateConfig, run

    if imagenet_root:
        if dataset not in ("", "imagenet") or root:
            from protoclip_cli.errors import ProtoclipError

            raise ProtoclipError("--imagenet-root selects ImageNet; do not combine it with --dataset or --root.")
        dataset = "" if task.startswith("imagenet-") else "imagenet"
        root = imagenet_root
    config = EvaluateConfig(
        task=task, model=model or "", checkpoint=checkpoint, open_clip=open_clip_arch, pretrained=pretrained,
        dataset=dataset, root=root, classnames=classnames, templates=templates, captions=captions, split=split,
        out=out, batch_size=batch_size, workers=workers, device=device, cache=not no_cache, clusters=clusters,
        probe_method=probe_method, protocol=protocol,
    )
    manifest = run(config, workspace(workspace_path))
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
        info(f"wrote {record['path']}")

"""`protoclip cluster`: inspect a run's prototypes, or k-means any stored features."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption, workspace


def command(
    run: Optional[str] = typer.Argument(
        None, help="Run name or folder (default: the workspace's latest run).", show_default=False
    ),
    episode: str = typer.Option("last", "--episode", "-e", help="Episode number, or 'last'."),
    features: str = typer.Option("", "--features", help="Cluster this HDF5 file's `embeddings` instead (with --k).", show_default=False),
    k: int = typer.Option(0, "--k", help="Clusters for --features.", show_default=False),
    backend: str = typer.Option("auto", "--backend", help="k-means backend for --features: auto, torch or faiss."),
    iterations: int = typer.Option(20, "--iterations", help="k-means iterations for --features."),
    restarts: int = typer.Option(1, "--restarts", help="k-means restarts for --features."),
    tsne_points: int = typer.Option(1000, "--tsne-points", help="Samples in the t-SNE map (0 = none)."),
    device: str = typer.Option("auto", "--device", help="Device for the t-SNE features."),
    out: str = typer.Option("", "--out", "-o", help="Report folder, or the HDF5 written by --features.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Seed of k-means, sampling and t-SNE."),
    workspace_path: Optional[Path] = WorkspaceOption,
) -> None:
    """Report on an episode's prototypes (sizes, agreement, purity, grids, t-SNE), or cluster a feature file."""
    from rich.table import Table

    from protoclip_cli.console import out as stdout
    from protoclip_cli.stages.cluster import ClusterConfig, run as cluster

    config = ClusterConfig(run=run or "", episode=episode, features=features, k=k, backend=backend,
                           iterations=iterations, restarts=restarts, tsne_points=tsne_points, device=device,
                           out=out, seed=seed)
    manifest = cluster(config, workspace(workspace_path))
    table = Table(title=f"Clusters of {manifest['source']}" if manifest["mode"] == "features" else
                  f"Prototypes of {manifest['run']}, episode {manifest['episode']}")
    for column in ("clustering", "k", "n", "empty", "min", "max", "purity", "AMI vs truth"):
        table.add_column(column, justify="left" if column == "clustering" else "right")
    if manifest["mode"] == "features":
        s = manifest["sizes"]
        table.add_row("features", str(s["k"]), str(s["n"]), str(s["empty"]), str(s["min"]), str(s["max"]), "", "")
    else:
        for name, s in manifest["modalities"].items():
            truth = manifest["ground_truth"].get(name, {})
            table.add_row(name, str(s["k"]), str(s["n"]), str(s["empty"]), str(s["min"]), str(s["max"]),
                          f"{truth['purity']:.3f}" if truth else "-", f"{truth['ami']:.3f}" if truth else "-")
        for pair, scores in manifest["agreement"].items():
            table.add_row(f"AMI {pair}", "", "", "", "", "", "", f"{scores['ami']:.3f}")
    stdout.print(table)
    for path in manifest["files"]:
        stdout.print(path, soft_wrap=True)

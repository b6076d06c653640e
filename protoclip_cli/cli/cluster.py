"""`protoclip cluster`: inspect a run's prototypes, or k-means any stored features."""

from __future__ import annotations

from typing import Any

from protoclip_cli.cli.common import workspace
from protoclip_cli.cli.options import Flag, build_config, stage_command
from protoclip_cli.configs.cluster import ClusterConfig


def run(values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    from rich.table import Table

    from protoclip_cli.console import out as stdout
    from protoclip_cli.stages.cluster import run as cluster

    manifest = cluster(build_config(ClusterConfig, values, overrides), workspace(workspace_path))
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


command = stage_command(
    ClusterConfig,
    run,
    flags={"run": Flag(argument=True), "episode": Flag(("--episode", "-e")), "out": Flag(("--out", "-o"))},
    doc="""Report on an episode's prototypes (sizes, agreement, purity, grids, t-SNE), or cluster a feature file.

    Examples:

      protoclip cluster synthetic-protoclip --episode last

      protoclip cluster --features protoclip-workspace/datasets/synthetic/teacher/all-MiniLM-L6-v2.h5 --k 36
    """,
)

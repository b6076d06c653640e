"""`protoclip compare`: CLIP, ProtoCLIP and its ablations over seeds at equal samples seen, as a table."""

from __future__ import annotations

from typing import Any

from protoclip_cli.cli.common import workspace
from protoclip_cli.cli.options import Flag, build_config, stage_command
from protoclip_cli.configs.compare import CompareConfig



def _split(values: list[str] | None) -> list[str] | None:
    """Repeatable options also take comma-separated lists: --variants clip,protoclip."""
    return None if values is None else [part.strip() for value in values for part in value.split(",") if part.strip()]


def run(values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    from protoclip_cli.console import out
    from protoclip_cli.stages.compare import run as compare

    for name in ("variants", "curves"):
        values[name] = _split(values[name])
    result = compare(build_config(CompareConfig, values, overrides), workspace(workspace_path))
    print_table(result)
    print_cost(result)
    out.print(f"samples seen per run: {result['samples_seen']}; noise rule: {result['noise_rule']}")


def print_table(result: dict) -> None:
    from rich.table import Table

    from protoclip_cli.console import out
    from protoclip_cli.evaluation.reports.comparison import Cell, digits_for, format_cell

    table = Table(title=f"compare {result['config']['name']}: mean ± std over seeds (difference to {result['baseline']}, * beyond seed noise)")
    rows = result["table"]
    labels = list(next(iter(rows.values())))
    table.add_column("variant")
    for label in labels:
        table.add_column(label, justify="right")
    for variant, row in rows.items():
        table.add_row(variant, *(format_cell(Cell.from_json(row[label]), digits_for(label)) for label in labels))
    out.print(table)


def print_cost(result: dict) -> None:
    """Training wall time and the samples each variant needs to reach the baseline's final top-1."""
    from rich.table import Table

    from protoclip_cli.console import out

    baseline, budget = result["baseline"], result["samples_seen"]
    labels = sorted({label for per in result["efficiency"].values() for label in per})
    table = Table(title=f"training time, and samples to reach {baseline}'s final accuracy (of {budget:,})")
    table.add_column("variant")
    table.add_column("train s", justify="right")
    table.add_column(f"vs {baseline}", justify="right")
    for label in labels:
        table.add_column(label.replace(" top-1 (%)", ""), justify="right")
    for variant in result["table"]:
        cost = result["cost"].get(variant)
        reach = [result["efficiency"].get(variant, {}).get(label) for label in labels]
        table.add_row(
            variant, "-" if cost is None else f"{cost['mean']:.0f}",
            "-" if cost is None or cost["ratio"] is None else f"{cost['ratio']:.2f}",
            *("-" if r is None else ("n/a" if r["samples"] is None else f"{r['samples']:,.0f}") for r in reach),
        )
    out.print(table)


command = stage_command(
    CompareConfig,
    run,
    flags={
        "name": Flag(("--name", "-n")),
        "recipe": Flag(("--recipe", "-r")),
        "variants": Flag(("--variants", "-v")),
    },
    doc="""Train CLIP, ProtoCLIP and its ablations over seeds at equal samples seen; print the paper's table.

    Each (variant, seed) is an ordinary run (runs/<name>-<variant>-s<seed>) evaluated with every
    task; a rerun reuses finished runs and evaluations. The open_clip_train variant is OpenCLIP's
    own trainer with the CLIP baseline's settings on the same shards. Results:
    <workspace>/compare/<name>/compare.md, compare.json and curves.png (zero-shot and linear-probe top-1 against samples
    seen; the samples each variant needs to reach CLIP's final accuracy).
    Needs the data set and its teacher: `protoclip download synthetic && protoclip teacher-embed`.

    Examples:

      protoclip compare

      protoclip compare --variants clip,protoclip --seeds 2 --episodes 8 --name quick

      protoclip compare --recipe-set optim.lr=2e-3 --name lr2e-3

      protoclip compare --variants clip,protoclip,k64,warmup2 --curves clip,protoclip,k64,warmup2 --variant-seeds clip=5
    """,
)

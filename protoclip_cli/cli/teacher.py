"""`protoclip teacher-embed`: caption features from an external sentence-transformers teacher."""

from __future__ import annotations

from typing import Any

from protoclip_cli.cli.common import workspace
from protoclip_cli.cli.options import Flag, build_config, stage_command
from protoclip_cli.configs.teacher import TeacherConfig


def run(values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    from protoclip_cli.console import out
    from protoclip_cli.stages.teacher_embed import run as embed

    manifest = embed(build_config(TeacherConfig, values, overrides), workspace(workspace_path))
    rate = manifest.get("captions_per_s")
    # One unwrapped line on stdout, so scripts can pick up the file path.
    out.print(
        f"{manifest['teacher_file']}  {manifest['count']} captions x {manifest['dimension']} dims"
        + (f"  {rate:,.0f} captions/s" if rate and not manifest.get("reused") else ""),
        soft_wrap=True,
    )


command = stage_command(
    TeacherConfig,
    run,
    flags={
        "dataset": Flag(argument=True),
        "model": Flag(("--model", "-m")),
        "batch_size": Flag(("--batch-size", "-b")),
    },
    doc="""Encode the captions of a data set's train split with a text teacher into datasets/<name>/teacher/<model>.h5.

    Examples:

      protoclip teacher-embed synthetic

      protoclip teacher-embed cc3m --model all-roberta-large-v1 --pca-dim 64 --device cuda:0,cuda:1
    """,
)

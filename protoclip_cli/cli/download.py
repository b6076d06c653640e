"""`protoclip download`: make a data set's webdataset shards with img2dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption, workspace

KNOWN = ("synthetic", "cc3m", "cc12m")


def command(
    name: str = typer.Argument(
        "synthetic",
        help="Data set name: 'synthetic' (embedded), 'cc3m' / 'cc12m' (with --tsv), or any name with --url-list.",
    ),
    tsv: Optional[Path] = typer.Option(
        None, "--tsv", help="Raw Conceptual Captions TSV, no header (cc3m: caption<TAB>url, cc12m: url<TAB>caption)."
    ),
    url_list: Optional[Path] = typer.Option(
        None, "--url-list", help="URL list with named columns (tsv, csv or parquet)."
    ),
    input_format: str = typer.Option("tsv", "--input-format", help="Format of --url-list: tsv, csv or parquet."),
    url_col: str = typer.Option("url", "--url-col", help="URL column of --url-list."),
    caption_col: str = typer.Option("caption", "--caption-col", help="Caption column of --url-list."),
    extra_col: Optional[list[str]] = typer.Option(
        None, "--extra-col", help="Further column of --url-list kept in each sample's JSON (repeatable)."
    ),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Image side in pixels (synthetic 64, lists 256)."
    ),
    resize_mode: Optional[str] = typer.Option(
        None,
        "--resize-mode",
        help="border (pad to a square, the default), keep_ratio, keep_ratio_largest, center_crop or no.",
    ),
    processes: Optional[int] = typer.Option(
        None, "--processes", help="img2dataset processes (synthetic 2, lists CPU count)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Download threads per process (synthetic 1, for a deterministic sample order; lists 64)."
    ),
    samples_per_shard: Optional[int] = typer.Option(
        None, "--samples-per-shard", help="Samples per shard (synthetic 256, lists 10000)."
    ),
    timeout: Optional[int] = typer.Option(None, "--timeout", help="Seconds before a request gives up (10)."),
    retries: Optional[int] = typer.Option(
        None, "--retries", help="Extra tries per failed URL (synthetic 0, lists 2)."
    ),
    distributor: Optional[str] = typer.Option(
        None, "--distributor", help="img2dataset distributor: multiprocessing (the default) or pyspark."
    ),
    incremental: bool = typer.Option(
        True, "--incremental/--overwrite", help="Continue a previous run, skipping finished shards / start afresh."
    ),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="Embedded set: training samples (4096)."),
    heldout_size: Optional[int] = typer.Option(None, "--heldout-size", help="Embedded set: held-out samples (1024)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Embedded set: generator seed (0)."),
    workspace_path: Optional[Path] = WorkspaceOption,
) -> None:
    """Download a data set into webdataset shards (img2dataset) and write its manifest.

    Examples:

      protoclip download synthetic

      protoclip download cc3m --tsv Train_GCC-training.tsv --processes 16 --threads 64

      protoclip download mydata --url-list urls.parquet --input-format parquet --url-col URL --caption-col TEXT
    """
    from protoclip_cli.config import ConfigError
    from protoclip_cli.console import info, out
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages.download import make_config, run

    source, list_file, list_format = _source(name, tsv, url_list, input_format)
    settings = dict(
        url_list=str(list_file) if list_file else "", input_format=list_format, url_col=url_col,
        caption_col=caption_col, extra_cols=tuple(extra_col or ()), image_size=image_size,
        resize_mode=resize_mode, processes=processes, threads=threads, samples_per_shard=samples_per_shard,
        timeout=timeout, retries=retries, distributor=distributor, incremental=incremental,
        synthetic_train_size=train_size, synthetic_heldout_size=heldout_size, seed=seed,
    )  # fmt: skip
    choices = {"resize_mode": ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"),
               "distributor": ("multiprocessing", "pyspark")}  # fmt: skip
    for key, allowed in choices.items():
        if settings[key] is not None and settings[key] not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {settings[key]!r} is not one of {', '.join(allowed)}.")
    if source != "synthetic" and any(v is not None for v in (train_size, heldout_size, seed)):
        raise ProtoclipError("--train-size, --heldout-size and --seed apply to the embedded set only (synthetic).")

    ws = workspace(workspace_path)
    manifest = run(make_config(name, source, **settings), ws)
    out.print(summary_table(manifest))
    info(f"Data set '{name}' is ready in {ws.dataset_dir(name)}.")


def _source(
    name: str, tsv: Optional[Path], url_list: Optional[Path], input_format: str
) -> tuple[str, Optional[Path], str]:
    """(source, list file, list format) from the name and the list options."""
    from protoclip_cli.errors import ProtoclipError

    if tsv is not None and url_list is not None:
        raise ProtoclipError("Pass either --tsv (raw CC3M/CC12M file) or --url-list (named columns), not both.")
    if input_format not in ("tsv", "csv", "parquet"):
        raise ProtoclipError(f"--input-format {input_format!r} is not supported; use tsv, csv or parquet.")
    if url_list is not None:
        return "url_list", url_list, input_format
    if tsv is not None:
        if name not in ("cc3m", "cc12m"):
            raise ProtoclipError(
                f"--tsv reads the raw cc3m/cc12m files; for '{name}' pass --url-list FILE "
                "with --url-col and --caption-col."
            )
        return name, tsv, "tsv"
    if name == "synthetic":
        return "synthetic", None, "tsv"
    if name in ("cc3m", "cc12m"):
        raise ProtoclipError(
            f"'{name}' needs its URL file: pass --tsv FILE (the Conceptual Captions TSV, e.g. Train_GCC-training.tsv "
            "for cc3m, cc12m.tsv for cc12m)."
        )
    raise ProtoclipError(
        f"Unknown data set '{name}': the supported ones are {', '.join(KNOWN)}; for your own list pass --url-list FILE."
    )


def summary_table(manifest: dict):
    """A rich table of the manifest's per-split counts and most common failure reasons."""
    from rich.table import Table

    table = Table(title=f"Data set '{manifest['name']}' ({manifest['source']})")
    for column in ("split", "ok", "failed", "shards", "top failure reasons"):
        table.add_column(column, justify="right" if column in ("ok", "failed", "shards") else "left")
    for split, info in manifest["splits"].items():
        reasons = "; ".join(f"{reason[:60]} ({n})" for reason, n in list(info.get("failures", {}).items())[:3])
        table.add_row(split, str(info["count_ok"]), str(info["count_failed"]), str(len(info["shards"])), reasons or "-")
    return table

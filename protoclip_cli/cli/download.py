"""`protoclip download`: make a data set's webdataset shards with img2dataset."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from protoclip_cli.cli.common import workspace
from protoclip_cli.cli.options import Flag, build_config, stage_command
from protoclip_cli.configs.download import DownloadConfig, defaults_for

KNOWN = ("synthetic", "cc3m", "cc12m")
EMBEDDED_ONLY = ("synthetic_train_size", "synthetic_heldout_size", "seed")


def _list_default(field: str) -> str:
    if field == "processes":
        return "(URL lists: one per CPU core)"
    return f"(URL lists: {defaults_for('url_list')[field]})"


FLAGS = {
    "name": Flag(argument=True),
    "source": Flag(hidden=True),  # follows from the name and --tsv / --url-list
    "extra_cols": Flag(("--extra-col",)),
    "incremental": Flag(("--incremental/--overwrite",)),
    "verify": Flag(("--verify",)),
    "synthetic_train_size": Flag(("--train-size",)),
    "synthetic_heldout_size": Flag(("--heldout-size",)),
    **{field: Flag(note=_list_default(field)) for field in defaults_for("url_list")},
}

TSV = inspect.Parameter(
    "tsv", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
    default=typer.Option(None, "--tsv", help="Raw Conceptual Captions TSV, no header (cc3m: caption<TAB>url, "
                         "cc12m: url<TAB>caption).", show_default=False),
)  # fmt: skip


def run(values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    from protoclip_cli.console import info, out
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages.download import run as download

    name = values["name"] or DownloadConfig.name
    if values.pop("verify"):
        return _verify(name, values, overrides, workspace_path)
    if values["shards_at"]:
        return _relocate(name, values, overrides, workspace_path)
    list_format = values["input_format"] or DownloadConfig.input_format
    source, list_file, list_format = _source(name, values.pop("tsv"), values["url_list"], list_format)
    if source != "synthetic" and any(values[field] is not None for field in EMBEDDED_ONLY):
        raise ProtoclipError("--train-size, --heldout-size and --seed apply to the embedded set only (synthetic).")
    values.update(name=name, url_list=str(list_file) if list_file else None, input_format=list_format)
    config = build_config(DownloadConfig, values, overrides, base={"source": source, **defaults_for(source)})
    ws = workspace(workspace_path)
    manifest = download(config, ws)
    out.print(summary_table(manifest))
    info(f"Data set '{config.name}' is ready in {ws.dataset_dir(config.name)}.")


RUN_SETTINGS = ("processes", "threads", "timeout", "retries", "distributor", "max_pixels")


def _verify(name: str, values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    """`download NAME --verify`: the data set as downloaded, re-read and repaired."""
    from protoclip_cli.console import info, out
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages.download import recorded_config
    from protoclip_cli.stages.download import run as download

    given = [key for key, value in values.items() if key not in (*RUN_SETTINGS, "name") and value not in (None, [])]
    if given or overrides:
        option = "--set" if overrides else "--" + given[0].replace("_", "-")
        raise ProtoclipError(
            f"--verify reads the data set with the settings of its download, so {option} does not apply; pass only "
            "--processes, --threads, --timeout, --retries, --distributor or --max-pixels with it."
        )
    ws = workspace(workspace_path)
    manifest = download(recorded_config(name, ws, **{key: values[key] for key in RUN_SETTINGS}), ws)
    out.print(verify_table(manifest))
    dropped = sum(split["dropped"] for split in manifest["verify"].values())
    found = sum(split["found_bad"] for split in manifest["verify"].values())
    if not found:
        info(f"Every sample of data set '{name}' reads and decodes; nothing to repair.")
    elif dropped:
        info(f"Data set '{name}' is repaired; {dropped} sample(s) could not be re-fetched and were dropped (the "
             "manifest lists them). Teacher files of the old version: rerun `protoclip teacher-embed "
             f"{name} --force`, or train with --trust-teacher (the kept captions are unchanged).")
    else:
        info(f"Data set '{name}' is repaired: every broken shard was re-fetched whole.")


def _relocate(name: str, values: dict[str, Any], overrides: list[str], workspace_path) -> None:
    """`download NAME --shards-at LOCATION`: the data set's shards were moved there."""
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages.download import relocate

    given = [key for key, value in values.items() if key not in ("name", "shards_at", "tsv") and value not in (None, [])]
    if given or overrides or values.get("tsv"):
        option = "--set" if overrides else "--" + (given[0] if given else "tsv").replace("_", "-")
        raise ProtoclipError(f"--shards-at records where the shards are and downloads nothing, so {option} does not apply.")
    relocate(name, values["shards_at"], workspace(workspace_path))


def verify_table(manifest: dict):
    """Per split: shards and samples checked, broken samples found, shards re-fetched, samples dropped."""
    from rich.table import Table

    table = Table(title=f"Verified data set '{manifest['name']}'")
    for column in ("split", "shards", "samples", "broken found", "damaged tars", "re-fetched shards", "dropped"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, report in manifest["verify"].items():
        table.add_row(split, str(report["shards"]), str(report["samples"]), str(report["found_bad"]),
                      str(len(report["damaged_shards"])), str(len(report["refetched"])), str(report["dropped"]))
    return table


def _source(
    name: str, tsv: Optional[Path], url_list: Optional[str], input_format: str
) -> tuple[str, Optional[Path], str]:
    """(source, list file, list format) from the name and the list options."""
    from protoclip_cli.errors import ProtoclipError

    if tsv is not None and url_list is not None:
        raise ProtoclipError("Pass either --tsv (raw CC3M/CC12M file) or --url-list (named columns), not both.")
    if url_list is not None:
        return "url_list", Path(url_list), input_format
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


command = stage_command(
    DownloadConfig,
    run,
    flags=FLAGS,
    extra=(TSV,),
    doc="""Download a data set into webdataset shards (img2dataset) and write its manifest.

    Examples:

      protoclip download synthetic

      protoclip download cc3m --tsv Train_GCC-training.tsv --processes 16 --threads 64

      protoclip download mydata --url-list urls.parquet --input-format parquet --url-col URL --caption-col TEXT

      protoclip download cc3m --verify

      protoclip download cc12m --tsv cc12m.tsv --output s3://my-bucket/cc12m

      protoclip download cc3m --shards-at 'pipe:aws s3 cp s3://my-bucket/cc3m/{folder}/{shard} -'
    """,
)

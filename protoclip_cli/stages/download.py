"""The ``download`` stage: a URL list -> webdataset shards through img2dataset, plus a manifest.

Sources:
- ``synthetic``: the embedded data set (:mod:`protoclip_cli.data.synthetic`) is rendered to
  ``<workspace>/cache/<name>/<split>/`` and handed to img2dataset as ``file://`` URLs, so the real
  download path runs with no network. Splits ``train`` and ``heldout``; every sample's JSON carries
  the ground-truth attributes.
- ``cc3m`` / ``cc12m``: the raw Conceptual Captions TSV files (no header; CC3M is caption then URL,
  CC12M is URL then caption).
- ``url_list``: any tsv/csv/parquet list with named URL and caption columns.

The stage orchestrates: URL lists are read and checked, or rendered, by
:mod:`protoclip_cli.data.url_lists`; img2dataset runs split by split through
:mod:`protoclip_cli.data.downloader`. The manifest is written last and only when every shard
finished: a failed or interrupted run leaves no manifest, so later stages refuse the data set;
rerunning continues where it stopped (img2dataset skips shards that have a ``*_stats.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from protoclip_cli.artifacts import MANIFEST, write_json, write_manifest, write_text
from protoclip_cli.config import check_choices, option, require
from protoclip_cli.console import info
from protoclip_cli.data.url_lists import RESERVED_COLUMNS
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.workspace import Workspace, is_valid_name, name_error

Source = Literal["synthetic", "cc3m", "cc12m", "url_list"]

# Settings that change what ends up in the shards: an incremental rerun must not mix two of them.
DATA_SETTINGS = (
    "source", "url_list", "input_format", "url_col", "caption_col", "extra_cols", "image_size",
    "resize_mode", "samples_per_shard", "encode_quality", "synthetic_train_size",
    "synthetic_heldout_size", "seed",
)  # fmt: skip


@dataclass(frozen=True)
class DownloadConfig:
    """What to download and how (img2dataset's settings)."""

    name: str = option("synthetic", "Data set name: the folder <workspace>/datasets/<name>.")
    source: Source = option(
        "synthetic", "'synthetic' (embedded set), 'cc3m' / 'cc12m' (raw TSV) or 'url_list' (named columns)."
    )
    url_list: str = option("", "URL list file (cc3m / cc12m TSV, or a tsv/csv/parquet list for url_list).")
    input_format: Literal["tsv", "csv", "parquet"] = option("tsv", "Format of a url_list file.")
    url_col: str = option("url", "URL column of a url_list file.")
    caption_col: str = option("caption", "Caption column of a url_list file.")
    extra_cols: tuple[str, ...] = option((), "Further columns of the list kept in each sample's JSON.")
    image_size: int = option(64, "Side of the stored images in pixels.")
    resize_mode: Literal["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"] = option(
        "border", "img2dataset resize mode: 'border' pads to a square, 'keep_ratio' keeps the aspect ratio."
    )
    # Two processes: img2dataset restarts a worker every 5 shards, and each start costs seconds.
    processes: int = option(2, "img2dataset worker processes.")
    # One thread for the embedded set: img2dataset writes a shard in the order downloads finish, so
    # a single thread keeps the shards' contents in a deterministic order (reproducible runs).
    threads: int = option(1, "Download threads per process.")
    samples_per_shard: int = option(256, "Samples per webdataset shard.")
    timeout: int = option(10, "Seconds before a URL request gives up.")
    retries: int = option(0, "Extra tries for a URL that failed.")
    distributor: Literal["multiprocessing", "pyspark"] = option("multiprocessing", "img2dataset distributor.")
    incremental: bool = option(True, "Continue a previous run (skip finished shards); false: start afresh.")
    encode_quality: int = option(95, "JPEG quality of the stored images.")
    synthetic_train_size: int = option(4096, "Embedded set: training samples.")
    synthetic_heldout_size: int = option(1024, "Embedded set: held-out samples (evaluation).")
    seed: int = option(0, "Embedded set: generator seed (the held-out split uses its own streams).")

    def __post_init__(self) -> None:
        check_choices(self)
        require(is_valid_name(self.name), name_error("Data set name", self.name, "protoclip download my-data"))
        for name in ("image_size", "processes", "threads", "samples_per_shard", "timeout"):
            value = getattr(self, name)
            require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        require(
            self.source != "synthetic" or min(self.synthetic_train_size, self.synthetic_heldout_size) >= 1,
            "The embedded data set needs at least 1 training and 1 held-out sample.",
        )
        require(
            self.source == "synthetic" or bool(self.url_list),
            f"Source '{self.source}' needs a URL list file; pass --url-list FILE (or --tsv FILE).",
        )
        reserved = sorted(RESERVED_COLUMNS.intersection(self.extra_cols))
        require(not reserved, f"Extra column '{reserved[0] if reserved else ''}' clashes with img2dataset's own metadata; rename it.")


def defaults_for(source: Source) -> dict[str, Any]:
    """Settings that suit a source, to fill in what the user did not set.

    The embedded set is small and local (the dataclass defaults: 64 px, 256 samples per shard, two
    processes); web lists use img2dataset's CC3M example settings (256 px, 10,000 samples per
    shard, one process per core, 64 threads) plus retries for flaky hosts.
    """
    if source == "synthetic":
        return {}
    return {
        "image_size": 256,
        "resize_mode": "border",
        "processes": max(1, os.cpu_count() or 1),
        "threads": 64,
        "samples_per_shard": 10000,
        "retries": 2,
    }


def make_config(name: str, source: Source, **settings: Any) -> DownloadConfig:
    """A :class:`DownloadConfig` with the source's defaults under the given (non-None) settings."""
    values = {**defaults_for(source), **{k: v for k, v in settings.items() if v is not None}}
    return DownloadConfig(name=name, source=source, **values)


# -- the stage -----------------------------------------------------------------------------------


def run(config: DownloadConfig, workspace: Workspace) -> dict[str, Any]:
    """Download ``config``'s data set into ``workspace``; return the written manifest."""
    _check_environment(config)
    _check_settings(config, workspace)
    from protoclip_cli.data import downloader

    checks: dict[str, dict[str, int]] = {}
    lists = _prepare_url_lists(config, workspace, checks)
    dataset_dir = workspace.dataset_dir(config.name)
    previous = _previous_manifest(dataset_dir / MANIFEST)
    # From here on the data set is in flux: later stages must refuse it until the new manifest lands.
    (dataset_dir / MANIFEST).unlink(missing_ok=True)
    write_json(workspace.download_settings_file(config.name), _data_settings(config))
    splits: dict[str, dict[str, Any]] = {}
    for split, (url_file, rows, extra_cols) in lists.items():
        folder = workspace.split_dir(config.name, split)
        log = workspace.download_log(config.name, split)
        if not config.incremental and folder.exists():
            # img2dataset's own overwrite mode deletes its temporary folder too; clear it here instead.
            shutil.rmtree(folder)
        if downloader.unfinished_shards(folder, rows, config.samples_per_shard):
            downloader.download_split(
                url_file, folder, label=f"{config.name}/{split}", rows=rows, extra_cols=extra_cols, log=log,
                image_size=config.image_size, resize_mode=config.resize_mode, encode_quality=config.encode_quality,
                processes=config.processes, threads=config.threads, samples_per_shard=config.samples_per_shard,
                timeout=config.timeout, retries=config.retries, distributor=config.distributor,
            )  # fmt: skip
        else:
            info(f"{config.name}/{split}: every shard is already downloaded.")
        splits[split] = downloader.collect_split(
            folder, name=config.name, split=split, rows=rows, samples_per_shard=config.samples_per_shard, log=log
        )
        if split in checks:
            splits[split]["url_list"] = checks[split]

    fields: dict[str, Any] = {
        "name": config.name,
        "source": config.source,
        "count_ok": sum(s["count_ok"] for s in splits.values()),
        "count_failed": sum(s["count_failed"] for s in splits.values()),
        "image_size": config.image_size,
        "splits": splits,
    }
    if config.source == "synthetic":
        from protoclip_cli.data import synthetic

        fields["ground_truth"] = {
            "attribute": "class_name",
            "classes": list(synthetic.CLASS_NAMES),
            "templates": list(synthetic.TEMPLATES),
            "attributes": list(synthetic.ATTRIBUTE_COLUMNS),
        }
    if previous is not None and _same_data(previous[1], config, fields):
        # A rerun that changed nothing keeps the manifest byte for byte: its sha256 is the data
        # set's version, which teacher files record, so a no-op rerun must not make them stale.
        write_text(dataset_dir / MANIFEST, previous[0])
        return previous[1]
    return write_manifest(dataset_dir, "download", dataclasses.asdict(config), **fields)


def _previous_manifest(path: Path) -> tuple[str, dict[str, Any]] | None:
    try:
        text = path.read_text()
        return text, json.loads(text)
    except (OSError, ValueError):
        return None


def _same_data(previous: dict[str, Any], config: DownloadConfig, fields: dict[str, Any]) -> bool:
    """The previous manifest describes the same shards: same data settings and the same summary."""
    settings = _data_settings(config)
    old_settings = {**previous.get("config", {}), "extra_cols": list(previous.get("config", {}).get("extra_cols", []))}
    if config.url_list and old_settings.get("url_list"):
        old_settings["url_list"] = str(Path(old_settings["url_list"]).resolve())
    same_settings = all(old_settings.get(key) == settings[key] for key in DATA_SETTINGS)
    return same_settings and all(previous.get(key) == value for key, value in fields.items())


def _check_environment(config: DownloadConfig) -> None:
    if config.distributor == "pyspark":
        import importlib.util

        if importlib.util.find_spec("pyspark") is None:
            raise ProtoclipError(
                "--distributor pyspark needs pyspark; install it (pip install pyspark) or use multiprocessing."
            )


def _data_settings(config: DownloadConfig) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    settings = {key: values[key] for key in DATA_SETTINGS}
    settings["extra_cols"] = list(settings["extra_cols"])
    if config.url_list:
        settings["url_list"] = str(Path(config.url_list).resolve())
    return settings


def _check_settings(config: DownloadConfig, workspace: Workspace) -> None:
    """Refuse to continue shards that were made with other settings."""
    path = workspace.download_settings_file(config.name)
    settings = _data_settings(config)
    if config.incremental and path.is_file():
        previous = json.loads(path.read_text())
        changed = [key for key in DATA_SETTINGS if previous.get(key) != settings[key]]
        if changed:
            key = changed[0]
            raise ProtoclipError(
                f"Data set '{config.name}' was downloaded with {key}={previous.get(key)!r}, not "
                f"{settings[key]!r}; rerun with --overwrite to start afresh, or choose another name."
            )


# -- URL lists -----------------------------------------------------------------------------------


def _prepare_url_lists(
    config: DownloadConfig, workspace: Workspace, checks: dict[str, dict[str, int]]
) -> dict[str, tuple[Path, int, list[str]]]:
    """split -> (parquet URL list for img2dataset, its row count, extra columns to keep); a user's
    list's checks (rows, duplicate URLs, repaired text) go to ``checks`` by split."""
    from protoclip_cli.data import url_lists

    cache = workspace.cache_dir(config.name)
    if config.source == "synthetic":
        from protoclip_cli.data import synthetic

        sizes = {"train": config.synthetic_train_size, "heldout": config.synthetic_heldout_size}
        rendered = {
            split: url_lists.synthetic_url_list(cache / split, split, count, seed=config.seed,
                                                image_size=config.image_size, quality=config.encode_quality)
            for split, count in sizes.items()
        }  # fmt: skip
        return {split: (rendered[split], sizes[split], list(synthetic.ATTRIBUTE_COLUMNS)) for split in sizes}
    checked = url_lists.read_url_list(
        Path(config.url_list),
        config.input_format if config.source == "url_list" else "tsv",
        config.url_col,
        config.caption_col,
        list(config.extra_cols),
        header=url_lists.HEADERLESS_COLUMNS.get(config.source),
    )
    target = url_lists.write_url_list(checked.table, cache / "urls.parquet")
    checks["train"] = checked.report()
    return {"train": (target, checked.rows, list(config.extra_cols))}

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
from pathlib import Path
from typing import Any

from protoclip_cli.artifacts import MANIFEST, write_json, write_manifest, write_text
from protoclip_cli.configs.download import DATA_SETTINGS, DownloadConfig, defaults_for
from protoclip_cli.console import info
from protoclip_cli.data import downloader, shard_verify, synthetic, url_lists
from protoclip_cli.data.remote import check_reachable, filesystem, is_remote
from protoclip_cli.data.shards import shard_keys, split_counts
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.workspace import Workspace, shard_location, split_folder

# -- the stage -----------------------------------------------------------------------------------


def run(config: DownloadConfig, workspace: Workspace) -> dict[str, Any]:
    """Download ``config``'s data set into ``workspace`` (or verify it: ``config.verify``; or record
    where its shards were moved: ``config.shards_at``); return the written manifest."""
    if config.verify:
        return verify(config, workspace)
    if config.shards_at:
        return relocate(config.name, config.shards_at, workspace)
    _check_environment(config)
    _check_settings(config, workspace)

    checks: dict[str, dict[str, int]] = {}
    lists = _prepare_url_lists(config, workspace, checks)
    dataset_dir = workspace.dataset_dir(config.name)
    previous = _previous_manifest(dataset_dir / MANIFEST)
    # From here on the data set is in flux: later stages must refuse it until the new manifest lands.
    (dataset_dir / MANIFEST).unlink(missing_ok=True)
    write_json(workspace.download_settings_file(config.name), _data_settings(config))
    splits: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, (url_file, rows, extra_cols) in lists.items():
        folder = _split_folder(config, workspace, split)
        log = workspace.download_log(config.name, split)
        if not config.incremental:
            # img2dataset's own overwrite mode deletes its temporary folder too; clear it here instead.
            downloader.remove_folder(folder)
        if downloader.unfinished_shards(folder, rows, config.samples_per_shard):
            _img2dataset(config, workspace, split, url_file, rows, extra_cols)
        else:
            info(f"{config.name}/{split}: every shard is already downloaded.")
        splits[split] = downloader.collect_split(
            folder, name=config.name, split=split, rows=rows, samples_per_shard=config.samples_per_shard, log=log
        )
        if split in checks:
            splits[split]["url_list"] = checks[split]
        counts[split] = {shard: n for shard, n in downloader.shard_counts(folder).items() if shard in splits[split]["shards"]}
    if config.output:
        workspace.record_shards_at(config.name, _absolute(config.output), counts)
    else:
        workspace.shards_at_file(config.name).unlink(missing_ok=True)  # the shards are back in the workspace

    fields: dict[str, Any] = {
        "name": config.name,
        "source": config.source,
        "count_ok": sum(s["count_ok"] for s in splits.values()),
        "count_failed": sum(s["count_failed"] for s in splits.values()),
        "image_size": config.image_size,
        "splits": splits,
    }
    if config.source == "synthetic":
        fields["ground_truth"] = synthetic.ground_truth()
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


def _split_folder(config: DownloadConfig, workspace: Workspace, split: str) -> Path | str:
    """Where img2dataset writes the shards of ``split``: the workspace, or under ``--output``."""
    if not config.output:
        return workspace.split_dir(config.name, split)
    return f"{_absolute(config.output).rstrip('/')}/{split_folder(split)}"


def _absolute(location: str) -> str:
    """A URL as it is, a folder as an absolute path (the record must not depend on where a command ran)."""
    return location if is_remote(location) else str(Path(location).resolve())


def _img2dataset(config: DownloadConfig, workspace: Workspace, split: str, url_file: Path, rows: int, extra_cols: list[str]) -> None:
    """Download the shards of ``split`` that have no ``*_stats.json`` yet."""
    downloader.download_split(
        url_file, _split_folder(config, workspace, split), label=f"{config.name}/{split}", rows=rows,
        extra_cols=extra_cols, log=workspace.download_log(config.name, split), image_size=config.image_size,
        resize_mode=config.resize_mode, encode_quality=config.encode_quality, processes=config.processes,
        threads=config.threads, samples_per_shard=config.samples_per_shard, timeout=config.timeout,
        retries=config.retries, distributor=config.distributor, max_pixels=config.max_pixels,
    )  # fmt: skip


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
    cache = workspace.cache_dir(config.name)
    if config.source == "synthetic":
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


# -- verify and repair -------------------------------------------------------------------------------


def recorded_config(name: str, workspace: Workspace, **run_settings: Any) -> DownloadConfig:
    """The config of data set ``name``'s download (its recorded data settings) with ``verify`` on and
    the run settings given now (processes, threads, timeout, retries, distributor; None: default)."""
    path = workspace.download_settings_file(name)
    if not path.is_file():
        raise ProtoclipError(f"Data set '{name}' has no {path.name}; download it with `protoclip download {name}` first.")
    settings = json.loads(path.read_text())
    settings["extra_cols"] = tuple(settings.get("extra_cols", ()))
    given = {key: value for key, value in run_settings.items() if value is not None}
    return DownloadConfig(**{**defaults_for(settings["source"]), **settings, **given, "name": name, "verify": True})


def verify(config: DownloadConfig, workspace: Workspace) -> dict[str, Any]:
    """Re-read every shard of the data set; re-fetch the broken shards where the URL list allows it,
    drop the broken samples that remain; rewrite the manifest only if something changed.

    Returns the manifest with ``verify``: per split the shards and samples checked, the broken
    samples found, the shards re-fetched and the samples dropped (not stored in the manifest, whose
    ``dropped`` records keep what was removed)."""
    dataset_dir = workspace.dataset_dir(config.name)
    manifest = workspace.dataset_manifest(config.name)  # a data set that finished downloading
    elsewhere = workspace.shards_at(config.name)
    if elsewhere is not None:
        raise ProtoclipError(
            f"--verify repairs shards in the data set's folder, but those of '{config.name}' live at "
            f"{elsewhere['location']}; verify a local copy (`protoclip download {config.name} --shards-at COPY` with "
            "the copy's folder, then --verify) and copy the repaired shards back."
        )
    previous = _previous_manifest(dataset_dir / MANIFEST)

    def in_flux() -> None:
        # Before the first shard changes: later stages must refuse the data set until the new manifest lands.
        (dataset_dir / MANIFEST).unlink(missing_ok=True)

    splits, reports = dict(manifest["splits"]), {}
    for split, record in manifest["splits"].items():
        folder = workspace.split_dir(config.name, split)
        report = shard_verify.repair_split(
            [folder / shard for shard in record["shards"]], label=f"{config.name}/{split}",
            processes=config.processes, refetch=lambda shards, split=split: _refetch(config, workspace, split),
            before_change=in_flux,
        )  # fmt: skip
        reports[split] = report
        if report.changed:
            rows = sum(stats["count"] for stats in downloader.read_stats(folder).values())
            splits[split] = {**record, **downloader.collect_split(
                folder, name=config.name, split=split, rows=rows, samples_per_shard=config.samples_per_shard,
                log=workspace.download_log(config.name, split),
            )}  # fmt: skip
    summary = {split: {"shards": r.shards, "samples": r.samples, "found_bad": r.found_bad,
                       "damaged_shards": r.damaged_shards, "refetched": r.refetched, "dropped": len(r.dropped)}
               for split, r in reports.items()}  # fmt: skip
    fields = {"splits": splits, "count_ok": sum(s["count_ok"] for s in splits.values()),
              "count_failed": sum(s["count_failed"] for s in splits.values())}  # fmt: skip
    if all(manifest.get(key) == value for key, value in fields.items()):
        # Nothing dropped (or re-fetched shards identical): the manifest, and with it the data
        # set's version that teacher files record, stays as it was.
        if previous is not None and not (dataset_dir / MANIFEST).is_file():
            write_text(dataset_dir / MANIFEST, previous[0])
        return {**manifest, "verify": summary}
    own = ("stage", "schema_version", "protoclip_version", "created_at", "config", "inputs")
    kept = {key: value for key, value in manifest.items() if key not in own}
    written = write_manifest(dataset_dir, "download", manifest.get("config", {}), **{**kept, **fields})
    return {**written, "verify": summary}


def _refetch(config: DownloadConfig, workspace: Workspace, split: str) -> None:
    """Download again the shards of ``split`` whose files were set aside (they have no stats)."""
    try:
        lists = _prepare_url_lists(config, workspace, {})
    except ProtoclipError:
        # The user's list is gone: the checked copy download made of it serves as well.
        cached = workspace.cache_dir(config.name) / "urls.parquet"
        if config.source == "synthetic" or split != "train" or not cached.is_file():
            raise
        lists = {"train": (cached, url_lists.row_count(cached), list(config.extra_cols))}
    url_file, rows, extra_cols = lists[split]
    _img2dataset(config, workspace, split, url_file, rows, extra_cols)


# -- shards that moved ----------------------------------------------------------------------------


def relocate(name: str, location: str, workspace: Workspace) -> dict[str, Any]:
    """Record that the shards of data set ``name`` now live at ``location`` (``--shards-at``); returns
    its manifest, unchanged: the same shards elsewhere are the same version of the data set.

    Each split's sample counts travel with the record (from the shards where they were, or from
    img2dataset's stats next to them at the new place, or counted in the tars there), so that
    planning a run reads no remote file; the first shard of each split is read at the new place
    before anything is recorded. The data set's own folder as ``location`` forgets the record."""
    manifest = workspace.dataset_manifest(name)
    if not is_remote(location) and Path(location).resolve() == workspace.dataset_dir(name).resolve():
        workspace.shards_at_file(name).unlink(missing_ok=True)
        info(f"Data set '{name}' reads its shards from {workspace.dataset_dir(name)} again.")
        return manifest
    location = location if "{shard}" in location else _absolute(location)
    counts = {}
    for split, record in manifest["splits"].items():
        shards = {shard: shard_location(location, split, shard) for shard in record["shards"]}
        if shards:
            check_reachable(next(iter(shards.values())))
        counts[split] = _moved_counts(workspace, name, split, shards)
    workspace.record_shards_at(name, location, counts)
    info(f"Data set '{name}' reads its shards at {location} from now on ({workspace.shards_at_file(name)}).")
    return manifest


def _moved_counts(workspace: Workspace, name: str, split: str, moved: dict[str, str]) -> dict[str, int]:
    """Samples per shard of a split that moved: as counted where it was, else at the new place."""
    try:
        return split_counts(workspace, name, split)
    except (ProtoclipError, OSError):  # the old copy is gone
        pass
    return {shard: _stats_beside(url) or len(shard_keys(url)) for shard, url in moved.items()}


def _stats_beside(url: str) -> int | None:
    """img2dataset's sample count of a shard from the ``*_stats.json`` beside it (None: there is none)."""
    if url.startswith("pipe:") or not url.endswith(".tar"):
        return None
    try:
        fs, path = filesystem(url[: -len(".tar")] + "_stats.json")
        return int(json.loads(fs.cat_file(path))["successes"])
    except (OSError, ValueError, KeyError):
        return None

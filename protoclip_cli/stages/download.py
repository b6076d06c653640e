"""The ``download`` stage: a URL list -> webdataset shards through img2dataset, plus a manifest.

Sources:
- ``synthetic``: the embedded data set (:mod:`protoclip_cli.data.synthetic`) is rendered to
  ``<workspace>/cache/<name>/<split>/`` and handed to img2dataset as ``file://`` URLs, so the real
  download path runs with no network. Splits ``train`` and ``heldout``; every sample's JSON carries
  the ground-truth attributes.
- ``cc3m`` / ``cc12m``: the raw Conceptual Captions TSV files (no header; CC3M is caption then URL,
  CC12M is URL then caption).
- ``url_list``: any tsv/csv/parquet list with named URL and caption columns.

URL lists are checked (file, columns, rows) and rewritten as one parquet file with the columns
``url``, ``caption`` and any extra columns before img2dataset sees them, so a bad list fails with
one sentence instead of a stack trace from a worker process.

The manifest is written last and only when every shard finished: a failed or interrupted run leaves
no manifest, so later stages refuse the data set; rerunning continues where it stopped
(img2dataset skips shards that have a ``*_stats.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from protoclip_cli.artifacts import MANIFEST, write_json, write_manifest
from protoclip_cli.config import option
from protoclip_cli.console import console, info, progress, warn
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.workspace import Workspace

Source = Literal["synthetic", "cc3m", "cc12m", "url_list"]
# Column order of the header-less Conceptual Captions TSV files.
HEADERLESS_COLUMNS: dict[str, tuple[str, str]] = {
    "cc3m": ("caption", "url"),
    "cc12m": ("url", "caption"),
}

# img2dataset keeps these names for its own metadata; an extra column may not use them.
RESERVED_COLUMNS = frozenset(
    {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
     "error_message", "exif", "md5", "sha256", "sha512"}
)  # fmt: skip

# Settings that change what ends up in the shards: an incremental rerun must not mix two of them.
DATA_SETTINGS = (
    "source", "url_list", "input_format", "url_col", "caption_col", "extra_cols", "image_size",
    "resize_mode", "samples_per_shard", "encode_quality", "synthetic_train_size",
    "synthetic_heldout_size", "seed",
)  # fmt: skip

SHARD_DIGITS = 5  # img2dataset's default oom_shard_count: shard files are 00000.tar, 00001.tar, ...


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
    _check_config(config)
    _check_settings(config, workspace)
    lists = _prepare_url_lists(config, workspace)
    dataset_dir = workspace.dataset_dir(config.name)
    # From here on the data set is in flux: later stages must refuse it until the new manifest lands.
    (dataset_dir / MANIFEST).unlink(missing_ok=True)
    write_json(_settings_file(config, workspace), _data_settings(config))
    splits: dict[str, dict[str, Any]] = {}
    for split, (url_file, rows, extra_cols) in lists.items():
        folder = workspace.split_dir(config.name, split)
        if not config.incremental and folder.exists():
            # img2dataset's own overwrite mode deletes its temporary folder too; clear it here instead.
            shutil.rmtree(folder)
        if _unfinished_shards(folder, rows, config.samples_per_shard):
            _download_split(config, url_file, folder, rows, extra_cols, split, dataset_dir / "logs" / f"{split}.log")
        else:
            info(f"{config.name}/{split}: every shard is already downloaded.")
        splits[split] = _collect_split(folder, rows, split, config)

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
    return write_manifest(dataset_dir, "download", dataclasses.asdict(config), **fields)


def _check_config(config: DownloadConfig) -> None:
    hints = typing.get_type_hints(DownloadConfig)
    for field in dataclasses.fields(DownloadConfig):
        allowed = typing.get_args(hints[field.name]) if typing.get_origin(hints[field.name]) is Literal else ()
        if allowed and getattr(config, field.name) not in allowed:
            raise ProtoclipError(
                f"{field.name} {getattr(config, field.name)!r} is not one of {', '.join(allowed)}."
            )
    positive = ("image_size", "processes", "threads", "samples_per_shard", "timeout")
    for name in positive:
        if getattr(config, name) < 1:
            raise ProtoclipError(f"{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}.")
    if config.source == "synthetic" and min(config.synthetic_train_size, config.synthetic_heldout_size) < 1:
        raise ProtoclipError("The embedded data set needs at least 1 training and 1 held-out sample.")
    if config.source != "synthetic" and not config.url_list:
        raise ProtoclipError(f"Source '{config.source}' needs a URL list file; pass --url-list FILE (or --tsv FILE).")
    reserved = sorted(RESERVED_COLUMNS.intersection(config.extra_cols))
    if reserved:
        raise ProtoclipError(f"Extra column '{reserved[0]}' clashes with img2dataset's own metadata; rename it.")
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


def _settings_file(config: DownloadConfig, workspace: Workspace) -> Path:
    return workspace.dataset_dir(config.name) / "download-settings.json"


def _check_settings(config: DownloadConfig, workspace: Workspace) -> None:
    """Refuse to continue shards that were made with other settings."""
    path = _settings_file(config, workspace)
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


def _prepare_url_lists(config: DownloadConfig, workspace: Workspace) -> dict[str, tuple[Path, int, list[str]]]:
    """split -> (parquet URL list for img2dataset, its row count, extra columns to keep)."""
    cache = workspace.root / "cache" / config.name
    if config.source == "synthetic":
        from protoclip_cli.data import synthetic

        sizes = {"train": config.synthetic_train_size, "heldout": config.synthetic_heldout_size}
        return {
            split: (_render_synthetic(config, cache / split, split, count), count, list(synthetic.ATTRIBUTE_COLUMNS))
            for split, count in sizes.items()
        }
    table = read_url_list(
        Path(config.url_list),
        config.input_format if config.source == "url_list" else "tsv",
        config.url_col,
        config.caption_col,
        list(config.extra_cols),
        header=HEADERLESS_COLUMNS.get(config.source),
    )
    import pyarrow.parquet as pq

    target = cache / "urls.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    from protoclip_cli.artifacts import atomic_path

    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return {"train": (target, table.num_rows, list(config.extra_cols))}


def read_url_list(
    path: Path,
    input_format: str,
    url_col: str = "url",
    caption_col: str = "caption",
    extra_cols: list[str] | None = None,
    header: tuple[str, ...] | None = None,
):
    """Read and check a URL list; return a pyarrow Table with columns ``url``, ``caption``, extras.

    ``header`` names the columns of a file without a header row (the raw CC3M / CC12M TSVs).
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    extra_cols = list(extra_cols or [])
    if not path.is_file():
        raise ProtoclipError(f"URL list {path} does not exist; check the path.")
    try:
        if input_format == "parquet":
            table = pq.read_table(path)
        elif input_format in ("tsv", "csv"):
            delimiter = "\t" if input_format == "tsv" else ","
            # The raw CC TSVs hold unescaped quotes inside captions: read them without quoting.
            parse = pa_csv.ParseOptions(delimiter=delimiter, quote_char=False if header else '"')
            read = pa_csv.ReadOptions(column_names=list(header) if header else None)
            convert = pa_csv.ConvertOptions(strings_can_be_null=False)
            table = pa_csv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        else:
            raise ProtoclipError(f"Unknown URL list format '{input_format}'; use tsv, csv or parquet.")
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise ProtoclipError(f"URL list {path} is empty; it needs one row per image.") from exc
        raise ProtoclipError(f"Cannot read URL list {path} as {input_format} ({exc}); check --input-format.") from exc

    if header:
        url_col, caption_col = "url", "caption"
    wanted = [url_col, caption_col, *extra_cols]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ProtoclipError(
            f"URL list {path} has no column '{missing[0]}' (found: {', '.join(table.column_names)}); "
            "name its columns with --url-col and --caption-col."
        )
    if table.num_rows == 0:
        raise ProtoclipError(f"URL list {path} has no rows; it needs one row per image.")
    columns = {
        "url": table[url_col].cast(pa.string()),
        "caption": table[caption_col].cast(pa.string()),
        **{c: table[c] for c in extra_cols},
    }
    return pa.table(columns)


def _render_synthetic(config: DownloadConfig, folder: Path, split: str, count: int) -> Path:
    """Render a split of the embedded set (reusing an identical earlier rendering); return its URL list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from protoclip_cli.artifacts import atomic_path
    from protoclip_cli.data import synthetic

    url_file = folder / "urls.parquet"
    params = {"count": count, "seed": config.seed, "split": split, "image_size": config.image_size,
              "quality": config.encode_quality, "generator": synthetic.GENERATOR_VERSION}  # fmt: skip
    params_file = folder / "params.json"
    if url_file.is_file() and params_file.is_file() and json.loads(params_file.read_text()) == params:
        return url_file
    params_file.unlink(missing_ok=True)

    started = time.perf_counter()
    with progress(transient=True) as bar:
        task = bar.add_task(f"render {split}", total=count, rate="")
        items = synthetic.write_images(
            folder, count, config.seed, split, config.image_size, config.encode_quality,
            on_image=lambda: bar.advance(task),
        )  # fmt: skip
    columns: dict[str, list] = {
        "url": [(folder / f"{item.index:06d}.jpg").resolve().as_uri() for item in items],
        "caption": [item.caption for item in items],
    }
    for attribute in synthetic.ATTRIBUTE_COLUMNS:
        columns[attribute] = [getattr(item, attribute) for item in items]
    with atomic_path(url_file) as tmp:
        pq.write_table(pa.table(columns), tmp)
    write_json(params_file, params)
    info(f"Rendered {count} {split} images in {time.perf_counter() - started:.1f} s ({folder}).")
    return url_file


# -- img2dataset -----------------------------------------------------------------------------------


def _download_split(
    config: DownloadConfig, url_file: Path, folder: Path, rows: int, extra_cols: list[str], split: str, log: Path
) -> None:
    # img2dataset (through albumentations) otherwise checks the network for a newer version.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    folder.mkdir(parents=True, exist_ok=True)
    previous_sigint = signal.getsignal(signal.SIGINT)
    stop = threading.Event()
    with _output_to(log), progress(redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(f"download {config.name}/{split}", total=rows, rate="")
        watcher = threading.Thread(target=_watch_stats, args=(folder, bar, task, stop), daemon=True)
        watcher.start()
        try:
            img2dataset.download(
                url_list=str(url_file),
                input_format="parquet",
                url_col="url",
                caption_col="caption",
                save_additional_columns=extra_cols or None,
                output_folder=str(folder),
                output_format="webdataset",
                encode_format="jpg",
                encode_quality=config.encode_quality,
                image_size=config.image_size,
                resize_mode=config.resize_mode,
                processes_count=config.processes,
                thread_count=config.threads,
                number_sample_per_shard=config.samples_per_shard,
                timeout=config.timeout,
                retries=config.retries,
                distributor=config.distributor,
                incremental_mode="incremental",
                enable_wandb=False,
                extract_exif=False,
                oom_shard_count=SHARD_DIGITS,
            )
        except SystemExit as exc:
            # img2dataset turns Ctrl-C into sys.exit(0); a stopped download must not look finished.
            raise ProtoclipError(
                f"Download of {config.name}/{split} was interrupted; rerun the same command to continue."
            ) from exc
        except Exception as exc:
            raise ProtoclipError(f"img2dataset failed on {config.name}/{split} ({exc}); see {log}.") from exc
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            stop.set()
            watcher.join()
            _update_bar(folder, bar, task)


def _update_bar(folder: Path, bar, task) -> None:
    done, started, ended = 0, math.inf, -math.inf
    for stats in _read_stats(folder).values():
        done += stats.get("count", 0)
        started = min(started, stats.get("start_time", math.inf))
        ended = max(ended, stats.get("end_time", -math.inf))
    rate = f"{done / (ended - started):.0f} img/s" if done and ended > started else ""
    bar.update(task, completed=done, rate=rate)


def _watch_stats(folder: Path, bar, task, stop: threading.Event) -> None:
    """Advance the bar as img2dataset's workers finish shards (each writes a *_stats.json)."""
    while not stop.wait(0.5):
        with contextlib.suppress(OSError, ValueError):
            _update_bar(folder, bar, task)


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send img2dataset's prints and tqdm bars (its worker processes' too) to ``log``.

    File descriptors 1 and 2 are redirected, since spawned workers inherit them; the shared console
    is pinned to the previous stderr so the rich progress bar stays on screen.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    previous_console_file = console._file
    stderr_is_fd2 = _fileno(sys.stderr) == 2
    terminal = os.fdopen(os.dup(2), "w", buffering=1) if stderr_is_fd2 else sys.stderr
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(log, "a", buffering=1) as sink:
        console.file = terminal
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            console.file = previous_console_file
            if stderr_is_fd2:
                terminal.close()


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# -- results ---------------------------------------------------------------------------------------


def _read_stats(folder: Path) -> dict[int, dict[str, Any]]:
    stats = {}
    for path in folder.glob("*_stats.json"):
        with contextlib.suppress(ValueError, OSError):
            stats[int(path.name.split("_")[0])] = json.loads(path.read_text())
    return stats


def _unfinished_shards(folder: Path, rows: int, samples_per_shard: int) -> list[int]:
    """Shard numbers without img2dataset's *_stats.json (which it writes when a shard is done)."""
    done = _read_stats(folder)
    return [i for i in range(math.ceil(rows / samples_per_shard)) if i not in done]


def _collect_split(folder: Path, rows: int, split: str, config: DownloadConfig) -> dict[str, Any]:
    """Sum the per-shard stats of a finished split; keep only complete, non-empty shards."""
    stats = _read_stats(folder)
    expected = math.ceil(rows / config.samples_per_shard)
    unfinished = _unfinished_shards(folder, rows, config.samples_per_shard)
    if unfinished:
        raise ProtoclipError(
            f"{len(unfinished)} of {expected} shards of {config.name}/{split} did not finish (see "
            f"{folder.parent / 'logs' / (split + '.log')}); rerun the same command to continue."
        )
    shards, reasons = [], {}
    ok = failed_download = failed_resize = 0
    for shard_id in range(expected):
        shard = stats[shard_id]
        ok += shard["successes"]
        failed_download += shard["failed_to_download"]
        failed_resize += shard["failed_to_resize"]
        for reason, n in shard.get("status_dict", {}).items():
            if reason != "success":
                reasons[reason] = reasons.get(reason, 0) + n
        tar = folder / f"{shard_id:0{SHARD_DIGITS}d}.tar"
        if shard["successes"] == 0:
            # An empty tar would only trip a reader later; img2dataset's stats keep the record.
            tar.unlink(missing_ok=True)
        elif not tar.is_file():
            raise ProtoclipError(f"Shard {tar} is missing; rerun with --overwrite to download {split} afresh.")
        else:
            shards.append(tar.name)
    if ok == 0:
        top = ", ".join(f"{r} ({n})" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        raise ProtoclipError(
            f"Every one of the {rows} URLs of {config.name}/{split} failed ({top}); check the list and the "
            "network, then rerun with --overwrite."
        )
    failed = failed_download + failed_resize
    if failed:
        warn(f"{failed} of {rows} samples of {config.name}/{split} failed; the manifest lists the reasons.")
    return {
        "shards": shards,
        "count_ok": ok,
        "count_failed": failed,
        "failed_to_download": failed_download,
        "failed_to_resize": failed_resize,
        "failures": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }

"""img2dataset on one split: a URL list into webdataset shards, with a progress bar, and the split's
record read back from img2dataset's per-shard ``*_stats.json``.

img2dataset writes ``<folder>/00000.tar`` ... (:data:`SHARD_DIGITS` digits) and a
``<shard>_stats.json`` when a shard is complete; a rerun in incremental mode skips the shards that
have one. Its prints and tqdm bars (its worker processes' too) go to a log file, so the terminal
shows only this project's progress bar. The folder is a local path or a URL (``s3://bucket/prefix``):
img2dataset writes there through fsspec, and this module reads it back through fsspec too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterator

from protoclip_cli.console import progress, warn
from protoclip_cli.data.remote import filesystem, is_remote
from protoclip_cli.errors import Interrupted, ProtoclipError, write_error


SHARD_DIGITS = 5  # img2dataset's default oom_shard_count: shard files are 00000.tar, 00001.tar, ...
# Below this much free space the download is stopped as a full disk: a shard and its log lines no
# longer fit (see _watch_stats).
DISK_FULL_BYTES = 256 * 1024
OPENCV_PIXEL_LIMIT = "OPENCV_IO_MAX_IMAGE_PIXELS"
OVER_PIXEL_LIMIT = "more pixels than --max-pixels allows"


def download_split(
    url_file: Path,
    folder: Path | str,
    *,
    label: str,
    rows: int,
    extra_cols: list[str],
    log: Path,
    image_size: int,
    resize_mode: str,
    encode_quality: int,
    processes: int,
    threads: int,
    samples_per_shard: int,
    timeout: int,
    retries: int,
    distributor: str,
    max_pixels: int = 0,
) -> None:
    """Run img2dataset on ``url_file`` (parquet: ``url``, ``caption``, extras) into ``folder``.

    ``label`` (``<data set>/<split>``) names the split in the progress bar and in errors; an
    interruption or a failure of img2dataset is a :class:`ProtoclipError` pointing at ``log``.
    ``max_pixels`` (0: none) refuses larger images, counted as failed (:data:`OVER_PIXEL_LIMIT`).
    """
    # img2dataset (through albumentations) otherwise checks the network for a newer version.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if max_pixels:
        # OpenCV checks this limit after reading an image's header, before decoding it; img2dataset's
        # own max_image_area is checked only after the decode. Read by its spawned workers at start.
        os.environ[OPENCV_PIXEL_LIMIT] = str(max_pixels)
    import img2dataset

    fs, path = filesystem(str(folder))
    fs.makedirs(path, exist_ok=True)
    if _free_bytes(folder) < DISK_FULL_BYTES:
        raise _disk_full(folder)
    previous_sigint = signal.getsignal(signal.SIGINT)
    stop, full = threading.Event(), threading.Event()
    with _output_to(log) as terminal, progress(file=terminal, redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(f"download {label}", total=rows, rate="")
        watcher = threading.Thread(target=_watch_stats, args=(folder, bar, task, stop, full), daemon=True)
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
                encode_quality=encode_quality,
                image_size=image_size,
                resize_mode=resize_mode,
                processes_count=processes,
                thread_count=threads,
                number_sample_per_shard=samples_per_shard,
                timeout=timeout,
                retries=retries,
                distributor=distributor,
                incremental_mode="incremental",
                enable_wandb=False,
                extract_exif=False,
                oom_shard_count=SHARD_DIGITS,
                max_image_area=max_pixels or float("inf"),
            )
        except (SystemExit, KeyboardInterrupt) as exc:
            if full.is_set():  # the watcher stopped it (below)
                raise _disk_full(folder) from None
            if isinstance(exc, KeyboardInterrupt):
                raise
            # img2dataset turns Ctrl-C into sys.exit(0); a stopped download must not look finished.
            raise Interrupted(f"Download of {label} was interrupted; rerun the same command to continue.") from exc
        except Exception as exc:
            if full.is_set() or _free_bytes(folder) < DISK_FULL_BYTES:  # e.g. its progress output to the log failed
                raise _disk_full(folder) from None
            raise ProtoclipError(f"img2dataset failed on {label} ({exc}); see {log}.") from exc
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            stop.set()
            watcher.join()
            _update_bar(folder, bar, task)


def _update_bar(folder: Path | str, bar, task, known: dict[int, dict[str, Any]] | None = None) -> None:
    done, started, ended = 0, math.inf, -math.inf
    for stats in read_stats(folder, known).values():
        done += stats.get("count", 0)
        started = min(started, stats.get("start_time", math.inf))
        ended = max(ended, stats.get("end_time", -math.inf))
    rate = f"{done / (ended - started):.0f} img/s" if done and ended > started else ""
    bar.update(task, completed=done, rate=rate)


def _watch_stats(folder: Path | str, bar, task, stop: threading.Event, full: threading.Event) -> None:
    """Advance the bar as img2dataset's workers finish shards (each writes a *_stats.json), and stop
    img2dataset when the disk fills (``full``).

    A full disk cannot be left to img2dataset: its workers print each failed write to their log,
    on the same disk, and a print that fails there leaves a semaphore unreleased, so the download
    hangs forever. Ctrl-C is how img2dataset stops cleanly (its handler ends the workers and exits).
    """
    known: dict[int, dict[str, Any]] = {}
    every = 5.0 if is_remote(folder) else 0.5  # a remote listing is a request
    while not stop.wait(every):
        with contextlib.suppress(OSError, ValueError):
            _update_bar(folder, bar, task, known)
        with contextlib.suppress(OSError):
            if not full.is_set() and _free_bytes(folder) < DISK_FULL_BYTES:
                full.set()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _free_bytes(folder: Path | str) -> float:
    """Bytes an unprivileged writer may still use on ``folder``'s file system (unbounded for object
    storage, whose fullness is its own error)."""
    if is_remote(folder):
        return math.inf
    status = os.statvfs(folder)
    return status.f_bavail * status.f_frsize


def _disk_full(folder: Path):
    """The WriteError of a download the disk cannot hold, once the shards it had not finished are
    removed."""
    _remove_unfinished(folder)
    return write_error(folder, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def _remove_unfinished(folder: Path) -> None:
    """Remove the files of shards img2dataset did not finish (no *_stats.json): they hold space the
    disk lacks, and a rerun downloads those shards again."""
    finished = read_stats(folder)
    for path in Path(folder).iterdir():
        number = path.name.split(".")[0].split("_")[0]
        if path.is_file() and number.isdigit() and int(number) not in finished:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[IO[str]]:
    """Send img2dataset's prints and tqdm bars (its worker processes' too) to ``log``; yields the
    stream the terminal was on, for the progress bar.

    File descriptors 1 and 2 are redirected, since spawned workers inherit them.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    stderr_is_fd2 = _fileno(sys.stderr) == 2
    terminal = os.fdopen(os.dup(2), "w", buffering=1) if stderr_is_fd2 else sys.stderr
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(log, "a", buffering=1) as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield terminal
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if stderr_is_fd2:
                terminal.close()


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# -- the split's record ----------------------------------------------------------------------------


def _listing(folder: Path | str, pattern: str) -> tuple[Any, str, list[str]]:
    """``(filesystem, the folder's path in it, paths)`` of the files of ``folder`` matching ``pattern``,
    listed afresh (fsspec caches remote listings, and img2dataset adds files while this module watches)."""
    fs, path = filesystem(str(folder))
    path = path.rstrip("/")
    fs.invalidate_cache(path)
    return fs, path, fs.glob(f"{path}/{pattern}")


def read_stats(folder: Path | str, known: dict[int, dict[str, Any]] | None = None) -> dict[int, dict[str, Any]]:
    """img2dataset's ``*_stats.json`` of ``folder``, by shard number. A shard's stats are written once,
    when it is complete: those in ``known`` (filled in place) are not read again, so watching a
    download lists the folder but reads each file once (on object storage, one request per shard)."""
    stats = {} if known is None else known
    fs, _, paths = _listing(folder, "*_stats.json")
    for path in paths:
        with contextlib.suppress(ValueError, OSError):
            number = int(path.rsplit("/", 1)[-1].split("_")[0])
            if number not in stats:
                stats[number] = json.loads(fs.cat_file(path))
    return stats


def shard_counts(folder: Path | str) -> dict[str, int]:
    """Samples of each complete shard of ``folder`` (``00000.tar``: img2dataset's ``successes``)."""
    return {f"{number:0{SHARD_DIGITS}d}.tar": int(stats["successes"]) for number, stats in read_stats(folder).items()}


def remove_folder(folder: Path | str) -> None:
    """Delete a split's folder and everything in it (``download --overwrite``)."""
    fs, path = filesystem(str(folder))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def readable_reason(reason: str) -> str:
    """img2dataset's failure reason as a user reads it: OpenCV's assertion on an empty buffer is an
    empty response body (a 200 with no bytes, an empty file), its assertion on the pixel limit an
    image over ``--max-pixels``."""
    reason = " ".join(reason.split())
    if "!buf.empty()" in reason:
        return "empty body"
    # OpenCV's refusal of an image over OPENCV_IO_MAX_IMAGE_PIXELS, or img2dataset's after a decode.
    if "CV_IO_MAX_IMAGE_PIXELS" in reason or reason == "image area too large":
        return OVER_PIXEL_LIMIT
    return reason


def unfinished_shards(folder: Path | str, rows: int, samples_per_shard: int) -> list[int]:
    """Shard numbers without img2dataset's *_stats.json (which it writes when a shard is done)."""
    done = read_stats(folder)
    return [i for i in range(math.ceil(rows / samples_per_shard)) if i not in done]


def collect_split(folder: Path | str, *, name: str, split: str, rows: int, samples_per_shard: int, log: Path) -> dict[str, Any]:
    """Sum the per-shard stats of a finished split; keep only complete, non-empty shards.

    Returns the split's manifest record: ``shards`` (file names), ``count_ok``, ``count_failed``,
    ``failed_to_download``, ``failed_to_resize``, ``failures`` (reason -> count, commonest first)
    and, once ``download --verify`` dropped samples, ``dropped`` (``count``, ``reasons``, ``keys``).
    """
    stats = read_stats(folder)
    expected = math.ceil(rows / samples_per_shard)
    unfinished = unfinished_shards(folder, rows, samples_per_shard)
    if unfinished:
        raise ProtoclipError(
            f"{len(unfinished)} of {expected} shards of {name}/{split} did not finish (see "
            f"{log}); rerun the same command to continue."
        )
    fs, base, tars = _listing(folder, "*.tar")
    present = {tar.rsplit("/", 1)[-1] for tar in tars}
    shards, reasons = [], {}
    ok = failed_download = failed_resize = 0
    dropped: dict[str, Any] = {"count": 0, "reasons": {}, "keys": []}
    for shard_id in range(expected):
        shard = stats[shard_id]
        ok += shard["successes"]
        verify = shard.get("verify")  # samples `download --verify` dropped (data/shard_verify.py)
        if verify:
            dropped["count"] += verify["dropped"]
            dropped["keys"] += verify["keys"]
            for reason, n in verify["reasons"].items():
                dropped["reasons"][reason] = dropped["reasons"].get(reason, 0) + n
        failed_download += shard["failed_to_download"]
        failed_resize += shard["failed_to_resize"]
        for reason, n in shard.get("status_dict", {}).items():
            if reason != "success":
                reasons[readable_reason(reason)] = reasons.get(readable_reason(reason), 0) + n
        tar = f"{shard_id:0{SHARD_DIGITS}d}.tar"
        if shard["successes"] == 0:
            # An empty tar would only trip a reader later; img2dataset's stats keep the record.
            if tar in present:
                fs.rm_file(f"{base}/{tar}")
        elif tar not in present:
            raise ProtoclipError(f"Shard {str(folder).rstrip('/')}/{tar} is missing; rerun with --overwrite to download {split} afresh.")
        else:
            shards.append(tar)
    if ok == 0:
        top = ", ".join(f"{r} ({n})" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        raise ProtoclipError(
            f"Every one of the {rows} URLs of {name}/{split} failed ({top}); check the list and the "
            "network, then rerun with --overwrite."
        )
    failed = failed_download + failed_resize
    if failed:
        warn(f"{failed} of {rows} samples of {name}/{split} failed; the manifest lists the reasons.")
    record = {
        "shards": shards,
        "count_ok": ok,
        "count_failed": failed,
        "failed_to_download": failed_download,
        "failed_to_resize": failed_resize,
        "failures": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }
    if dropped["count"]:
        record["dropped"] = {**dropped, "keys": sorted(dropped["keys"])}
    return record

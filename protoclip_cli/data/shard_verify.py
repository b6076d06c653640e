"""Verifying and repairing a downloaded split's shards (``protoclip download NAME --verify``).

A shard is read the way training reads it: tar records in order, every sample's JPEG decoded
(:func:`protoclip_cli.data.transforms.decode_image`), its caption decoded as UTF-8 and its JSON
parsed. A sample that fails is *broken*; a tar that stops early or has a damaged record is
*damaged*, and the samples img2dataset wrote after the damage (its ``<shard>.parquet`` lists
them) are *lost*.

:func:`repair_split` first re-fetches the bad shards when the caller can (``refetch``: the stage
runs img2dataset again on the data set's URL list, which redownloads exactly the shards whose
``*_stats.json`` is missing), keeping a re-fetched shard only if it holds at least as many good
samples as the old one (web links die). What is still bad is dropped: the shard is rewritten
without it, and the shard's ``*_stats.json`` gets its true ``successes`` and a ``verify`` record
(count, reasons, keys) that :func:`protoclip_cli.data.downloader.collect_split` sums into the
manifest, so every count stays true.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from protoclip_cli.artifacts import atomic_path, write_json
from protoclip_cli.console import progress, warn
from protoclip_cli.data.transforms import decode_image
from protoclip_cli.errors import ProtoclipError

REQUIRED = ("jpg", "txt")  # what training needs of a sample
LOST = "lost: the shard's tar ends or breaks before it"
SET_ASIDE = ".before-verify"  # suffix of a shard's files set aside while it is re-fetched


@dataclass
class ShardCheck:
    """What reading one shard found."""

    shard: Path
    good: list[int] = field(default_factory=list)  # keys of complete, decodable samples, in file order
    broken: dict[int, str] = field(default_factory=dict)  # key -> reason
    lost: list[int] = field(default_factory=list)  # keys img2dataset wrote that the tar no longer yields
    damage: str = ""  # why the tar could not be read to its end ("" when it could)

    @property
    def bad(self) -> int:
        return len(self.broken) + len(self.lost)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.damage

    def reasons(self) -> dict[int, str]:
        return {**self.broken, **{key: LOST for key in self.lost}}


def _key(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def _judge(parts: dict[str, bytes]) -> str:
    """Why a sample would be skipped in training ("" when it would not)."""
    missing = [ext for ext in REQUIRED if ext not in parts]
    if missing:
        return f"no .{missing[0]} in the tar"
    try:
        parts["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return "caption is not UTF-8"
    if "json" in parts:
        try:
            json.loads(parts["json"])
        except ValueError:
            return "metadata is not JSON"
    try:
        decode_image(parts["jpg"])
    except Exception as exc:  # whatever the decoder raises, training would skip the sample
        return f"image does not decode ({type(exc).__name__})"
    return ""


def check_shard(shard: Path) -> ShardCheck:
    """Read ``shard`` to its end (or its damage) and judge every sample."""
    result = ShardCheck(Path(shard))
    current, parts = "", {}

    def close_sample() -> None:
        if current:
            reason = _judge(parts)
            if reason:
                result.broken[int(current)] = reason
            else:
                result.good.append(int(current))

    try:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key = _key(member.name)
                if key != current:
                    close_sample()
                    current, parts = key, {}
                handle = tar.extractfile(member)
                parts[member.name.rsplit(".", 1)[-1]] = handle.read() if handle is not None else b""
        close_sample()
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        result.damage = str(exc) or type(exc).__name__
        # The sample being read when the tar broke counts as a reader would see it: whole if its
        # image and caption were read before the damage, else broken.
        if current and _judge(parts) and any(ext not in parts for ext in REQUIRED):
            result.broken[int(current)] = "tar record damaged"
        else:
            close_sample()
    result.lost = sorted(_written_keys(shard) - set(result.good) - set(result.broken))
    if result.lost and not result.damage:
        # tarfile (and so webdataset) reads a header cut by the end of the file as the archive's end.
        result.damage = f"the tar ends {len(result.lost)} sample(s) early"
    return result


def _written_keys(shard: Path) -> set[int]:
    """The keys ``shard`` should hold: those img2dataset stored (its ``<shard>.parquet``) less those
    an earlier repair dropped (its stats' ``verify`` record); empty when the metadata is unreadable."""
    stem = shard.name.removesuffix(".tar")
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(shard.with_name(f"{stem}.parquet"), columns=["key", "status"])
    except Exception:  # no or unreadable metadata: nothing is known lost
        return set()
    stored = {int(k) for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist()) if s == "success"}
    try:
        dropped = json.loads(shard.with_name(f"{stem}_stats.json").read_text()).get("verify", {}).get("keys", [])
    except (OSError, ValueError):
        dropped = []
    return stored - set(dropped)


def check_shards(shards: list[Path], processes: int, label: str) -> list[ShardCheck]:
    """:func:`check_shard` of every shard (in ``processes`` worker processes), with progress."""
    results: list[ShardCheck] = []
    with progress() as bar:
        task = bar.add_task(f"verify {label}", total=len(shards), rate="")
        if processes > 1 and len(shards) > 1:
            import multiprocessing

            # spawn: the workers import torchvision themselves (forking a process with torch's threads is unsafe).
            with ProcessPoolExecutor(min(processes, len(shards)), mp_context=multiprocessing.get_context("spawn")) as pool:
                for result in pool.map(check_shard, shards):
                    results.append(result)
                    bar.advance(task)
        else:
            for shard in shards:
                results.append(check_shard(shard))
                bar.advance(task)
    return results


# -- repair ----------------------------------------------------------------------------------------


@dataclass
class SplitRepair:
    """What :func:`repair_split` did to one split."""

    shards: int = 0
    samples: int = 0  # good samples after the repair
    found_bad: int = 0  # broken or lost samples the first check found
    damaged_shards: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)  # shards replaced by a re-download
    dropped: dict[int, str] = field(default_factory=dict)  # key -> reason, removed from the shards

    @property
    def changed(self) -> bool:
        return bool(self.refetched or self.dropped)


def _companions(shard: Path) -> list[Path]:
    """A shard's tar and img2dataset's files about it."""
    stem = shard.name.removesuffix(".tar")
    return [shard, shard.with_name(f"{stem}_stats.json"), shard.with_name(f"{stem}.parquet")]


def repair_split(
    shards: list[Path],
    *,
    label: str,
    processes: int,
    refetch: Callable[[list[Path]], None] | None,
    before_change: Callable[[], None] = lambda: None,
) -> SplitRepair:
    """Check ``shards``; re-fetch the bad ones through ``refetch`` (if given), drop what stays bad.
    ``before_change`` is called once before the first file changes."""
    if shards:
        restore_set_aside(shards[0].parent)
    checks = {c.shard: c for c in check_shards(shards, processes, label)}
    report = SplitRepair(shards=len(shards), found_bad=sum(c.bad for c in checks.values()))
    report.damaged_shards = [c.shard.name for c in checks.values() if c.damage]
    bad = [c for c in checks.values() if not c.ok]
    if bad:
        before_change()
    if bad and refetch is not None:
        for check in _refetch(bad, refetch, processes, label):
            checks[check.shard] = check
            report.refetched.append(check.shard.name)
    for check in checks.values():
        if not check.ok:
            drop(check)
            report.dropped.update(check.reasons())
    report.samples = sum(len(c.good) for c in checks.values())
    return report


def restore_set_aside(folder: Path) -> None:
    """Undo what a killed repair left, shard by shard: a re-fetch that finished (the shard has its
    ``*_stats.json`` again) keeps the new files, one that did not gets the old files back."""
    for aside_tar in folder.glob(f".*.tar{SET_ASIDE}"):
        shard = folder / aside_tar.name[1 : -len(SET_ASIDE)]
        finished = _companions(shard)[1].is_file()
        for path in _companions(shard):
            aside = path.with_name(f".{path.name}{SET_ASIDE}")
            if finished:
                aside.unlink(missing_ok=True)
            elif aside.exists():
                aside.replace(path)
            else:
                path.unlink(missing_ok=True)


def _refetch(bad: list[ShardCheck], refetch: Callable[[list[Path]], None], processes: int, label: str) -> list[ShardCheck]:
    """Re-download the bad shards; return the checks of those the new copy improves (the others
    are put back as they were)."""
    backups: dict[Path, list[tuple[Path, Path]]] = {}
    for check in bad:
        moved = []
        for path in _companions(check.shard):
            if path.exists():
                aside = path.with_name(f".{path.name}{SET_ASIDE}")
                path.replace(aside)
                moved.append((path, aside))
        backups[check.shard] = moved
    try:
        refetch([c.shard for c in bad])
        fresh = {c.shard: c for c in check_shards([c.shard for c in bad if c.shard.is_file()], processes, f"{label} re-fetched")}
    except ProtoclipError as exc:
        warn(f"Re-fetching the broken shards failed ({exc}); dropping their broken samples instead.")
        fresh = {}
    kept = []
    for check in bad:
        new = fresh.get(check.shard)
        if new is not None and len(new.good) >= len(check.good):
            for _, aside in backups[check.shard]:
                aside.unlink(missing_ok=True)
            kept.append(new)
            continue
        for path in _companions(check.shard):  # the re-download did not help: restore the old files
            path.unlink(missing_ok=True)
        for path, aside in backups[check.shard]:
            aside.replace(path)
    return kept


def drop(check: ShardCheck) -> None:
    """Rewrite ``check.shard`` with only its good samples and record the rest in its stats."""
    keep = {str(key) for key in check.good}
    with atomic_path(check.shard) as tmp:
        with tarfile.open(check.shard, "r|") as source, tarfile.open(tmp, "w") as target:
            with contextlib.suppress(tarfile.TarError, OSError, EOFError, ValueError):
                for member in source:
                    if member.isfile() and str(int(_key(member.name))) in keep:
                        target.addfile(member, source.extractfile(member))
    stats_path = _companions(check.shard)[1]
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    record = stats.get("verify", {"dropped": 0, "reasons": {}, "keys": []})
    for key, reason in sorted(check.reasons().items()):
        record["reasons"][reason] = record["reasons"].get(reason, 0) + 1
        record["keys"].append(key)
    record["dropped"] = len(record["keys"])
    stats.update(successes=len(check.good), verify=record)
    write_json(stats_path, stats)

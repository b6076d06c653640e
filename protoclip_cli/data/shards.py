"""Reading img2dataset's webdataset shards: one :class:`Sample` per record, joined on its integer key.

img2dataset writes each sample as ``<key>.jpg``, ``<key>.txt`` (caption) and ``<key>.json``
(metadata, including any extra columns of the URL list); the key is the shard number followed by
the zero-padded index in the shard, which we read as an int. A shard is a local path or a URL
(``data/remote.py``): :func:`tar_records` reads both with webdataset's tar expansion and grouping
over the stream :func:`~protoclip_cli.data.remote.open_shard` gives.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from protoclip_cli.data.remote import ShardUnavailable, is_remote, open_shard
from protoclip_cli.errors import ProtoclipError


@dataclass
class Sample:
    key: int
    caption: str
    image: bytes | None = None  # encoded JPEG bytes (None when images were not requested)
    meta: dict = field(default_factory=dict)


def tar_records(urls: Iterable[str | Path], handler: Callable[[Exception], bool] | None = None) -> Iterator[dict]:
    """The records (``__key__``, ``__url__`` and one entry per file extension, raw bytes) of the shards
    ``urls`` in order. ``handler`` sees each damaged tar record and returns True to skip it (webdataset's
    convention; default: raise). A shard that cannot be read after the retries always raises its
    :class:`~protoclip_cli.data.remote.ShardUnavailable`: a missing shard is no damaged record."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handle(exception: Exception) -> bool:
        if isinstance(exception, ShardUnavailable):
            # webdataset appends where it happened to the exception's arguments: raise the sentence alone.
            raise ShardUnavailable(str(exception.args[0]).split(" @ ")[0]) from None
        if handler is None:
            raise exception
        return handler(exception)

    def opened() -> Iterator[dict]:
        for url in urls:
            yield {"url": str(url), "stream": open_shard(url)}

    yield from group_by_keys(tar_file_expander(opened(), handler=handle), handler=handle)


def _check_local(shards: list[str]) -> None:
    if not shards:
        raise ProtoclipError("No shards to read; the data set's manifest lists none.")
    missing = [u for u in shards if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise ProtoclipError(f"Shard {missing[0]} is missing; rerun `protoclip download` for this data set.")


def iter_samples(shards: Iterable[str | Path], images: bool = True, meta: bool = True) -> Iterator[Sample]:
    """Stream the samples of ``shards`` in order (shard order, then position in the shard).

    A damaged shard (a cut tar, a caption that is not UTF-8, metadata that is not JSON) is a
    :class:`ProtoclipError` naming it and ``protoclip download NAME --verify``, which repairs it:
    the stages that read every sample (teacher-embed, cluster, evaluation) need every sample whole.
    """
    shards = [str(p) for p in shards]
    _check_local(shards)  # every local shard exists, before the first is read
    for shard in shards:  # one at a time, so that an error names its shard
        try:
            for record in tar_records([shard]):
                caption = record.get("txt", b"").decode("utf-8")
                yield Sample(
                    key=int(record["__key__"]),
                    caption=caption,
                    image=record.get("jpg") if images else None,
                    meta=json.loads(record["json"]) if meta and "json" in record else {},
                )
        except ShardUnavailable:
            raise
        except Exception as exc:  # tarfile, webdataset, UTF-8 and JSON errors all mean a damaged shard
            raise ProtoclipError(
                f"Shard {shard} is damaged ({_reason(exc)}); repair the data set with "
                f"`protoclip download {Path(shard).parent.parent.name or 'NAME'} --verify`."
            ) from exc


def _reason(exc: Exception) -> str:
    # webdataset re-raises a tar error with (message, stream, url) as its arguments.
    wrapped = not isinstance(exc, UnicodeError) and len(exc.args) == 3 and isinstance(exc.args[0], str)
    text = (exc.args[0].split(" @ ")[0] if wrapped else str(exc)).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def iter_captions(shards: Iterable[str | Path]) -> Iterator[tuple[int, str]]:
    """(key, caption) pairs without decoding images."""
    for sample in iter_samples(shards, images=False, meta=False):
        yield sample.key, sample.caption


def split_counts(workspace, name: str, split: str) -> dict[str, int]:
    """Samples per shard file of a split of a data set: recorded when the shards live elsewhere
    (``Workspace.shard_counts``, so no remote file is read to plan a run), else img2dataset's stats
    next to each shard (:func:`shard_sample_count`)."""
    files = workspace.shard_files(name, split)
    recorded = workspace.shard_counts(name, split)
    if recorded is None:
        return {file: shard_sample_count(Path(path)) for file, path in files.items()}
    missing = [file for file in files if file not in recorded]
    if missing:
        raise ProtoclipError(
            f"{workspace.shards_at_file(name)} has no sample count for shard {missing[0]} of {name}/{split}; record "
            f"the location again with `protoclip download {name} --shards-at LOCATION`."
        )
    return {file: recorded[file] for file in files}


def shard_sample_count(shard: Path) -> int:
    """Samples in a shard: img2dataset's ``<shard>_stats.json`` ``successes``, else counted in the tar."""
    stats = shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")
    if stats.is_file():
        data = json.loads(stats.read_text())
        if "successes" in data:
            return int(data["successes"])
    return len(shard_keys(shard))


def iter_key_stems(shard: str | Path) -> Iterator[str]:
    """The sample keys of a shard as img2dataset wrote them (zero-padded digits), in file order,
    from its tar headers (no image is decoded; a remote shard is streamed through)."""
    seen: set[str] = set()
    # A local tar is read by seeking from header to header; a remote one can only be streamed.
    with open_shard(shard) as stream, tarfile.open(fileobj=stream, mode="r|" if is_remote(shard) else "r") as tar:
        for member in tar:
            stem = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
            if member.isfile() and stem not in seen and stem.isdigit():
                seen.add(stem)
                yield stem


def shard_keys(shard: str | Path) -> list[int]:
    """The sample keys of a shard in file order (tar headers only)."""
    return [int(stem) for stem in iter_key_stems(shard)]

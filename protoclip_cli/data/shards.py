"""Reading img2dataset's webdataset shards: one :class:`Sample` per record, joined on its integer key.

img2dataset writes each sample as ``<key>.jpg``, ``<key>.txt`` (caption) and ``<key>.json``
(metadata, including any extra columns of the URL list); the key is the shard number followed by
the zero-padded index in the shard, which we read as an int.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from protoclip_cli.errors import ProtoclipError


@dataclass
class Sample:
    key: int
    caption: str
    image: bytes | None = None  # encoded JPEG bytes (None when images were not requested)
    meta: dict = field(default_factory=dict)


def _wds(shards: Iterable[str | Path]):
    import webdataset as wds

    urls = [str(p) for p in shards]
    if not urls:
        raise ProtoclipError("No shards to read; the data set's manifest lists none.")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ProtoclipError(f"Shard {missing[0]} is missing; rerun `protoclip download` for this data set.")
    # No node or worker splitting here: callers hand each rank and worker its own shard list, and
    # webdataset's defaults would split that list a second time (or refuse to run under torchrun).
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)


def iter_samples(shards: Iterable[str | Path], images: bool = True, meta: bool = True) -> Iterator[Sample]:
    """Stream the samples of ``shards`` in order (shard order, then position in the shard).

    A damaged shard (a cut tar, a caption that is not UTF-8, metadata that is not JSON) is a
    :class:`ProtoclipError` naming it and ``protoclip download NAME --verify``, which repairs it:
    the stages that read every sample (teacher-embed, cluster, evaluation) need every sample whole.
    """
    shards = [str(p) for p in shards]
    _wds(shards)  # every shard exists, before the first is read
    for shard in shards:  # one at a time, so that an error names its shard
        try:
            for record in _wds([shard]):
                caption = record.get("txt", b"").decode("utf-8")
                yield Sample(
                    key=int(record["__key__"]),
                    caption=caption,
                    image=record.get("jpg") if images else None,
                    meta=json.loads(record["json"]) if meta and "json" in record else {},
                )
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


def shard_sample_count(shard: Path) -> int:
    """Samples in a shard: img2dataset's ``<shard>_stats.json`` ``successes``, else counted in the tar."""
    stats = shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")
    if stats.is_file():
        data = json.loads(stats.read_text())
        if "successes" in data:
            return int(data["successes"])
    return len(shard_keys(shard))


def iter_key_stems(shard: Path) -> Iterator[str]:
    """The sample keys of a shard as img2dataset wrote them (zero-padded digits), in file order,
    from its tar headers (no image is read)."""
    seen: set[str] = set()
    with tarfile.open(shard) as tar:
        for member in tar:
            stem = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
            if member.isfile() and stem not in seen and stem.isdigit():
                seen.add(stem)
                yield stem


def shard_keys(shard: Path) -> list[int]:
    """The sample keys of a shard in file order (tar headers only)."""
    return [int(stem) for stem in iter_key_stems(shard)]

"""``protoclip download``'s config: what to download and how (img2dataset's settings)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from protoclip_cli.config import check_choices, option, require
from protoclip_cli.names import is_valid_name, name_error

# img2dataset keeps these names for its own metadata; an extra column may not use them.
RESERVED_COLUMNS = frozenset(
    {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
     "error_message", "exif", "md5", "sha256", "sha512"}
)  # fmt: skip


Source = Literal["synthetic", "cc3m", "cc12m", "url_list"]

MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: ~0.25 GB of 24-bit pixels


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
    # A 48 KB PNG can hold 20000 x 20000 pixels (1.2 GB decoded, per download thread): refused by
    # OpenCV after reading its header, before anything is decoded.
    max_pixels: int = option(
        MAX_PIXELS, "Images with more pixels are refused (counted as failed), before they are decoded "
        "(decompression bombs); 0 = no limit. Default: PIL's MAX_IMAGE_PIXELS."
    )
    distributor: Literal["multiprocessing", "pyspark"] = option("multiprocessing", "img2dataset distributor.")
    incremental: bool = option(True, "Continue a previous run (skip finished shards); false: start afresh.")
    encode_quality: int = option(95, "JPEG quality of the stored images.")
    synthetic_train_size: int = option(4096, "Embedded set: training samples.")
    synthetic_heldout_size: int = option(1024, "Embedded set: held-out samples (evaluation).")
    seed: int = option(0, "Embedded set: generator seed (the held-out split uses its own streams).")
    output: str = option(
        "",
        "Where img2dataset writes the shards: '' = the data set's folder in the workspace; a folder or a URL "
        "fsspec writes to (s3://bucket/prefix, gs://bucket/prefix): each split's shards go to OUTPUT/shards "
        "(train) or OUTPUT/<split>, and the workspace keeps the manifest and the small files.",
    )
    shards_at: str = option(
        "",
        "Record that the shards of a downloaded data set now live at this location, after you copied them "
        "there (nothing is downloaded, the manifest stays as it is): a folder or URL below which the split "
        "folders lie, or a template with {folder} and {shard} such as 'pipe:aws s3 cp s3://bucket/cc3m/{folder}/{shard} -'.",
    )
    verify: bool = option(
        False,
        "Re-read every shard of a downloaded data set (tar records, JPEG decodes, UTF-8 captions); re-fetch "
        "broken shards from the URL list where it allows, else drop the broken samples; the manifest stays true.",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        require(is_valid_name(self.name), name_error("Data set name", self.name, "protoclip download my-data"))
        for name in ("image_size", "processes", "threads", "samples_per_shard", "timeout"):
            value = getattr(self, name)
            require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        require(self.max_pixels >= 0, f"--max-pixels must be 0 (no limit) or positive, got {self.max_pixels}.")
        require(
            self.source != "synthetic" or min(self.synthetic_train_size, self.synthetic_heldout_size) >= 1,
            "The embedded data set needs at least 1 training and 1 held-out sample.",
        )
        require(
            self.source == "synthetic" or bool(self.url_list),
            f"Source '{self.source}' needs a URL list file; pass --url-list FILE (or --tsv FILE).",
        )
        require(
            not self.output.startswith("pipe:") and "{" not in self.output,
            f"--output {self.output} is no folder img2dataset can write to; pass a folder or a URL such as "
            "s3://bucket/prefix (pipe: commands and templates are for --shards-at).",
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

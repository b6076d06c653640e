"""URL lists, the input of img2dataset: a user's list read and checked, or the embedded set rendered
to one.

A list is checked (file, columns, rows) and rewritten as one parquet file with the columns ``url``,
``caption`` and any extra columns before img2dataset sees it, so a bad list fails with one sentence
instead of a stack trace from a worker process. The embedded data set
(:mod:`protoclip_cli.data.synthetic`) is rendered to JPEGs whose ``file://`` URLs make its list,
so the real download path runs with no network.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from protoclip_cli.artifacts import atomic_path, write_json
from protoclip_cli.console import info, progress, warn
from protoclip_cli.data import synthetic
from protoclip_cli.errors import ProtoclipError, WriteError

if TYPE_CHECKING:
    import pyarrow as pa

# Column order of the header-less Conceptual Captions TSV files.
HEADERLESS_COLUMNS: dict[str, tuple[str, str]] = {
    "cc3m": ("caption", "url"),
    "cc12m": ("url", "caption"),
}

# What a caption that is not UTF-8 is decoded as: web text in another encoding is nearly always
# Latin-1 or its Windows superset (cp1252: curly quotes, the euro sign); the five bytes cp1252 leaves
# undefined are read as Latin-1, so every byte keeps a character and no caption loses its sample.
TEXT_FALLBACK = "cp1252"


@dataclass(frozen=True)
class UrlList:
    """A checked URL list (columns ``url``, ``caption``, extras) and what the checks found."""

    table: "pa.Table"
    duplicate_urls: int = 0  # rows whose URL an earlier row has (kept: each row is its own sample)
    repaired_captions: int = 0  # captions with bytes that are not UTF-8, decoded as cp1252 (TEXT_FALLBACK)
    repaired_urls: int = 0  # URLs with bytes that are not UTF-8, those bytes percent-encoded

    @property
    def rows(self) -> int:
        return self.table.num_rows

    def report(self) -> dict[str, int]:
        """The counts recorded in the data set's manifest."""
        return {"rows": self.rows, "duplicate_urls": self.duplicate_urls,
                "non_utf8_captions": self.repaired_captions, "non_utf8_urls": self.repaired_urls}  # fmt: skip


def read_url_list(
    path: Path,
    input_format: str,
    url_col: str = "url",
    caption_col: str = "caption",
    extra_cols: list[str] | None = None,
    header: tuple[str, ...] | None = None,
) -> UrlList:
    """Read and check a URL list into columns ``url``, ``caption`` and the extras.

    ``header`` names the columns of a file without a header row (the raw CC3M / CC12M TSVs).
    A caption that is not UTF-8 is decoded as cp1252 (:data:`TEXT_FALLBACK`), a URL's bytes that
    are not UTF-8 are percent-encoded (as a browser sends them); both are counted and said with the
    first row. Rows repeating an earlier row's URL are counted and kept (each is its own sample).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    extra_cols = list(extra_cols or [])
    if path.is_dir():
        raise ProtoclipError(f"URL list {path} is a folder; pass the list file itself (tsv, csv or parquet).")
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
    urls, repaired_url_rows = _text(table[url_col], path, url_col, _percent_encoded)
    captions, repaired_caption_rows = _text(table[caption_col], path, caption_col, _fallback_decoded)
    checked = UrlList(
        pa.table({"url": urls, "caption": captions, **{c: table[c] for c in extra_cols}}),
        duplicate_urls=table.num_rows - pc.count_distinct(urls).as_py(),
        repaired_captions=len(repaired_caption_rows),
        repaired_urls=len(repaired_url_rows),
    )
    if repaired_caption_rows:
        first = repaired_caption_rows[0]
        warn(
            f"{len(repaired_caption_rows)} caption(s) of {path} are not UTF-8 (the first in row {first + 1}); they were "
            f"decoded as {TEXT_FALLBACK} (Windows Latin-1) instead, e.g. {captions[first].as_py()!r} (the manifest "
            "counts them)."
        )
    if repaired_url_rows:
        warn(
            f"{len(repaired_url_rows)} URL(s) of {path} hold bytes that are not UTF-8 (the first in row "
            f"{repaired_url_rows[0] + 1}); those bytes were percent-encoded, as a browser sends them."
        )
    if checked.duplicate_urls:
        warn(
            f"{checked.duplicate_urls} row(s) of {path} repeat the URL of an earlier row; they are kept, each "
            "downloaded as its own sample (deduplicate the list to avoid that)."
        )
    return checked


def _text(column, path: Path, name: str, repair: Callable[[bytes], str]):
    """``column`` as UTF-8 strings, with the rows (0-based) whose bytes are not UTF-8, each
    decoded by ``repair``. A string column is validated too: parquet writers can store bytes that
    are not UTF-8 in one."""
    import pyarrow as pa

    try:
        text = column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise ProtoclipError(f"Column '{name}' of URL list {path} is not text ({column.type}); name another column.") from exc
    else:
        try:
            text.validate(full=True)
            return text, []
        except pa.ArrowInvalid:
            column = text.cast(pa.binary())
    # Only a list with invalid bytes gets here: decode value by value, repairing what is not UTF-8.
    values, repaired = [], []
    for row, value in enumerate(column.to_pylist()):
        if value is None:
            values.append("")
            continue
        try:
            values.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(repair(value))
            repaired.append(row)
    return pa.chunked_array([pa.array(values, pa.string())]), repaired


def _fallback_decoded(value: bytes) -> str:
    try:
        return value.decode(TEXT_FALLBACK)
    except UnicodeDecodeError:  # one of the five bytes cp1252 leaves undefined
        return value.decode("latin-1")


def _percent_encoded(value: bytes) -> str:
    """The URL with every byte outside printable ASCII percent-encoded (valid UTF-8 sequences too,
    which is how they travel in a request anyway)."""
    from urllib.parse import quote

    return quote(value, safe=bytes(range(0x21, 0x7F)))


def row_count(url_file: Path) -> int:
    """Rows of a parquet URL list (from its metadata)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(url_file).metadata.num_rows


def write_url_list(table, target: Path) -> Path:
    """Write a checked list (:func:`read_url_list`) as the parquet file img2dataset reads."""
    import pyarrow.parquet as pq

    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target


def synthetic_url_list(folder: Path, split: str, count: int, *, seed: int, image_size: int, quality: int) -> Path:
    """Render a split of the embedded set into ``folder`` (reusing an identical earlier rendering);
    return its URL list (``urls.parquet``: ``file://`` URLs, captions and ground-truth attributes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url_file = folder / "urls.parquet"
    params = {"count": count, "seed": seed, "split": split, "image_size": image_size,
              "quality": quality, "generator": synthetic.GENERATOR_VERSION}  # fmt: skip
    params_file = folder / "params.json"
    if url_file.is_file() and params_file.is_file() and json.loads(params_file.read_text()) == params:
        return url_file
    params_file.unlink(missing_ok=True)

    started = time.perf_counter()
    try:
        with progress(transient=True) as bar:
            task = bar.add_task(f"render {split}", total=count, rate="")
            items = synthetic.write_images(
                folder, count, seed, split, image_size, quality, on_image=lambda: bar.advance(task)
            )
        columns: dict[str, list] = {
            "url": [(folder / f"{item.index:06d}.jpg").resolve().as_uri() for item in items],
            "caption": [item.caption for item in items],
        }
        for attribute in synthetic.ATTRIBUTE_COLUMNS:
            columns[attribute] = [getattr(item, attribute) for item in items]
        with atomic_path(url_file) as tmp:
            pq.write_table(pa.table(columns), tmp)
        write_json(params_file, params)
    except WriteError:
        # Half a rendering is of no use (the next run renders afresh) and holds the space the disk lacks.
        shutil.rmtree(folder, ignore_errors=True)
        raise
    info(f"Rendered {count} {split} images in {time.perf_counter() - started:.1f} s ({folder}).")
    return url_file

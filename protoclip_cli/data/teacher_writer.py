"""Writing the teacher file (:mod:`protoclip_cli.data.teacher_file` says what it holds and reads it).

Writing is resumable: chunks are written into a partial file next to the target
(:func:`partial_path`) whose ``complete_rows`` attribute is raised only after a chunk is flushed,
so a killed writer loses at most the chunk in flight; :func:`finalise` sorts the rows by key,
applies PCA and writes the final file by an atomic rename.

Both files get their whole disk space before HDF5 writes a row (:func:`_reserve`): a write that
fails inside HDF5 (a full disk, a file size limit) leaves its C library in a state that floods the
terminal with errors and ends the process with a segmentation fault. So their data sets are
allocated at creation (:func:`_allocated`) and the file's blocks reserved with
``posix_fallocate``; a disk that cannot hold the file is then an OSError before anything is
written, and every later write lands in space the file already owns.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protoclip_cli import __version__
from protoclip_cli.artifacts import atomic_path
from protoclip_cli.console import info
from protoclip_cli.data.teacher_file import normalisation
from protoclip_cli.errors import ProtoclipError, write_error

if TYPE_CHECKING:
    import numpy as np

_BLOCK = 65536  # rows read at a time when sorting, reducing and fitting PCA


# -- writing: the resumable partial file ---------------------------------------------------------


def partial_path(target: Path) -> Path:
    """Where an unfinished run keeps its committed chunks."""
    return target.with_name(f".{target.name}.partial")


def open_partial(partial: Path, identity: dict[str, Any], dimension: int, rows: int):
    """Open (or start) the partial file for ``rows`` captions of ``dimension`` features; one from
    other inputs, of another layout or unreadable after a crash is restarted. The file's disk space
    is reserved first: a disk that cannot hold it is a WriteError naming it, and a partial file that
    was resumable stays so.

    Returns the open ``h5py.File``; its ``complete_rows`` attribute counts the committed rows.
    """
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
            laid_out = _laid_out(handle, rows, dimension)
            if same_inputs and laid_out:
                try:
                    _reserve(partial, partial.stat().st_size)  # a copy may have lost its blocks
                except OSError as exc:
                    handle.close()
                    raise write_error(_sized(partial), exc) from exc
                return handle
            handle.close()
            info(f"Discarding {partial}: it was started for other inputs." if not same_inputs else
                 f"Discarding {partial}: it was written by an older version of protoclip.")
        partial.unlink()
    partial.parent.mkdir(parents=True, exist_ok=True)
    size = rows * (8 + 4 * dimension) + _METADATA_ALLOWANCE
    try:
        _reserve(partial, size)  # HDF5 must not meet a full disk even in its own first writes
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise write_error(_sized(partial, size), exc) from exc
    handle = h5py.File(partial, "w")
    handle.attrs["identity"] = json.dumps(identity, sort_keys=True)
    handle.attrs["complete_rows"] = 0
    _allocated(handle, "keys", (rows,), "int64")
    _allocated(handle, "embeddings", (rows, dimension), "float32")
    handle.flush()
    try:
        _reserve(partial, partial.stat().st_size)
    except OSError as exc:  # the disk filled since the check above
        handle.close()
        partial.unlink(missing_ok=True)
        raise write_error(_sized(partial, size), exc) from exc
    return handle


def _laid_out(handle, rows: int, dimension: int) -> bool:
    """The partial file has data sets of all the rows, allocated when it was created (older versions
    grew theirs chunk by chunk, which a full disk can break inside HDF5)."""
    try:
        keys, embeddings = handle["keys"], handle["embeddings"]
    except KeyError:
        return False
    return keys.shape == (rows,) and embeddings.shape == (rows, dimension) and keys.chunks is None


# Room for what HDF5 writes besides the data sets (superblock, object headers, attributes: the
# final file's manifest among them), reserved with them.
_METADATA_ALLOWANCE = 1 << 20


def _reserve(path: Path, size: int) -> None:
    """Make the disk hold the first ``size`` bytes of ``path`` (created if missing) now.

    A full disk, a quota or a file size limit is an OSError here; file systems that cannot reserve
    space (``EOPNOTSUPP``) are left to the writes themselves."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        os.posix_fallocate(descriptor, 0, max(size, 1))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
    finally:
        os.close(descriptor)


def _sized(path: Path, size: int | None = None) -> str:
    """``path`` with the space it needs, for the sentence of a reservation that failed."""
    size = path.stat().st_size if size is None and path.exists() else size
    return f"{path} ({size / 1e6:.1f} MB)" if size else str(path)


def _allocated(group, name: str, shape: tuple[int, ...], dtype: str):
    """A contiguous data set whose file space is allocated when it is created, not at its first
    write (so that the reservation that follows covers every later write)."""
    import h5py
    import numpy as np

    properties = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    properties.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    properties.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), h5py.h5s.create_simple(shape),
                    dcpl=properties)
    return group[name]


def committed_keys(handle) -> "np.ndarray":
    """The keys of the rows a partial file holds complete, in the order they were written."""
    return handle["keys"][: int(handle.attrs["complete_rows"])]


def append(handle, keys: "np.ndarray", embeddings: "np.ndarray", done: int) -> None:
    """Write one chunk after row ``done`` and only then record it as complete."""
    end = done + len(keys)
    if end > handle["keys"].shape[0]:
        raise ProtoclipError(
            f"The data set yields more captions than the {handle['keys'].shape[0]} its manifest counts; repair it "
            "with `protoclip download NAME --verify`."
        )
    handle["keys"][done:end] = keys
    handle["embeddings"][done:end] = embeddings
    handle.flush()
    handle.attrs["complete_rows"] = end
    handle.flush()


# -- finishing: sort by key, optional PCA, atomic write ------------------------------------------


def finalise(
    partial: Path, target: Path, identity: dict[str, Any], pca_dim: int, manifest: dict[str, Any],
    pca_normalise: bool = False,
) -> dict[str, Any]:
    """Write the final teacher file from a complete partial file; returns ``count`` (and the PCA's
    explained variance ratio), the fields the manifest gains from finishing."""
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
        dimension = pca_dim or features.shape[1]
        with atomic_path(target) as tmp:
            # The whole file's space first (see the module's docstring); its data sets, attributes
            # and reservation before the first row is written.
            size = rows * (8 + 4 * dimension) + (pca_dim + 2) * 4 * features.shape[1] + _METADATA_ALLOWANCE
            _reserve(tmp, size)
            with h5py.File(tmp, "w") as out:
                _write_final(out, source, rows, order, sorted_keys, dimension, pca, pca_normalise, identity, manifest,
                             tmp)
    return extra


def _write_final(out, source, rows: int, order, sorted_keys, dimension: int, pca, pca_normalise: bool,
                 identity: dict[str, Any], manifest: dict[str, Any], tmp: Path) -> None:
    """The final file's content: its data sets and attributes, its space reserved, then its rows."""
    import numpy as np

    features = source["embeddings"]
    pca_dim = dimension if pca is not None else 0
    arrays = {"keys": sorted_keys}
    if pca is not None:
        arrays.update(pca_mean=pca[0], pca_components=pca[1], pca_explained_variance=pca[2].astype(np.float32))
    written = {name: _allocated(out, name, array.shape, array.dtype.str) for name, array in arrays.items()}
    embeddings = _allocated(out, "embeddings", (rows, dimension), "float32")
    out.attrs.update({
        "stage": "teacher-embed",
        "model": identity["model"],
        "model_source": manifest["model_source"],
        "dimension": dimension,
        "source_dimension": features.shape[1],
        "normalisation": normalisation(pca_dim, pca_normalise),
        "pca_dim": pca_dim,
        "count": rows,
        "dataset": identity["dataset"],
        "dataset_manifest": manifest["inputs"]["dataset"]["path"],
        "dataset_manifest_sha256": identity["dataset_manifest_sha256"],
        "protoclip_version": __version__,
        "created_at": manifest["created_at"],
        "manifest": json.dumps(manifest, sort_keys=True, default=str),
    })
    out.flush()
    _reserve(tmp, tmp.stat().st_size)
    for name, array in arrays.items():
        written[name][...] = array
    for start in range(0, rows, _BLOCK):
        block = _read_rows(features, order[start : start + _BLOCK])
        if pca is not None:
            block = apply_pca(block, pca[0], pca[1], renormalise=pca_normalise)
        embeddings[start : start + len(block)] = block


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


def apply_pca(features: "np.ndarray", mean: "np.ndarray", components: "np.ndarray", renormalise: bool = False) -> "np.ndarray":
    """Reduce unit-norm model features with a stored PCA: ``(x - mean) @ components.T`` as the
    reference, re-normalised to unit length with ``renormalise`` (a file's ``normalisation``
    'l2-pca-l2')."""
    import numpy as np

    reduced = (np.asarray(features, dtype=np.float32) - mean) @ components.T
    if not renormalise:
        return reduced.astype(np.float32)
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return (reduced / np.maximum(norms, 1e-12)).astype(np.float32)

"""The teacher file ``datasets/<name>/teacher/<model-slug>.h5``: its format, writer, reader and checks.

``Workspace.teacher_file(dataset, model)`` says where the file lives; this module is the only code
that knows what is inside (docs/teacher-embed.md has the table):

- ``keys`` (N,) int64, the samples' keys, sorted and unique; ``embeddings`` (N, D) float32 rows
  aligned with ``keys``: the model's L2-normalised features;
- with PCA also ``pca_mean`` (D_model,), ``pca_components`` (D, D_model) and
  ``pca_explained_variance`` (D,) float32: ``embeddings = (x - pca_mean) @ pca_components.T`` for
  the model's unit-norm features ``x``, as the reference reduces its RoBERTa features
  (megvii-research/protoclip ``src/utils/RoBERTa.py``: L2-normalise, then faiss's PCA, no
  re-normalisation), or those rows L2-normalised again with ``--pca-normalise``
  (attribute ``normalisation``, :func:`apply_pca`);
- attributes describing the file (model, dimensions, normalisation, source data set and the sha256
  of its manifest, ...) and ``manifest``: the stage's manifest as JSON. The teacher folder holds one
  file per model, so the manifest lives inside the file rather than in a shared manifest.json.

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
from protoclip_cli.artifacts import atomic_path, file_sha256
from protoclip_cli.console import info
from protoclip_cli.data.sources import split_keys
from protoclip_cli.errors import MissingInputError, ProtoclipError, write_error

if TYPE_CHECKING:
    import numpy as np
    import torch

# What makes two teacher files interchangeable: a finished file is reused only when these match.
IDENTITY = ("model", "dataset", "dataset_manifest_sha256", "pca_dim", "normalisation")


def normalisation(pca_dim: int, pca_normalise: bool) -> str:
    """The ``normalisation`` attribute: the model's features L2-normalised ('l2'), then reduced by PCA
    as the reference ('l2-pca'), or reduced and L2-normalised again ('l2-pca-l2')."""
    if not pca_dim:
        return "l2"
    return "l2-pca-l2" if pca_normalise else "l2-pca"
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


# -- reading -------------------------------------------------------------------------------------


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


class TeacherRows:
    """Rows of a run's teacher files (one per data set, in ``data.datasets`` order) by sample key.

    A key's data set is in its high digits (``protoclip_cli.data.sources``); its row is found in
    that data set's sorted ``keys``. Each file is opened on first use and kept open, so a
    data-loader worker, which builds its batches' rows with one of these, opens its own handles.
    """

    def __init__(self, paths: "list[str | Path] | tuple[str | Path, ...]"):
        self.paths = [str(path) for path in paths]
        self._open: dict[int, tuple[Any, "np.ndarray"]] = {}

    def _file(self, index: int) -> tuple[Any, "np.ndarray"]:
        if index not in self._open:
            import h5py

            handle = h5py.File(self.paths[index], "r")
            self._open[index] = (handle, handle["keys"][:])
        return self._open[index]

    def _rows_of(self, index: int, wanted: "np.ndarray") -> "np.ndarray":
        import numpy as np

        handle, keys = self._file(index)
        rows = np.clip(np.searchsorted(keys, wanted), 0, max(len(keys) - 1, 0))
        if len(wanted) and (not len(keys) or not np.array_equal(keys[rows], wanted)):
            missing = wanted[keys[rows] != wanted][0] if len(keys) else wanted[0]
            raise ProtoclipError(
                f"Teacher file {self.paths[index]} has no row for sample {missing}; rerun `protoclip teacher-embed` "
                "for this data set."
            )
        # h5py reads strictly increasing rows; a batch may hold a sample twice (topped-up batches).
        unique_rows, inverse = np.unique(rows, return_inverse=True)
        if not len(unique_rows):
            return np.zeros((0, handle["embeddings"].shape[1]), dtype=np.float32)
        return np.asarray(handle["embeddings"][unique_rows], dtype=np.float32)[inverse.reshape(-1)]

    def rows(self, keys: "torch.Tensor") -> "torch.Tensor":
        """The teacher embeddings of ``keys`` (N,) as a float32 (N, D) tensor."""
        import numpy as np
        import torch

        wanted = keys.cpu().numpy()
        if len(self.paths) == 1:
            return torch.from_numpy(self._rows_of(0, wanted))

        index, local = split_keys(wanted)
        found = np.zeros((len(wanted), self._file(0)[0]["embeddings"].shape[1]), dtype=np.float32)
        for position in np.unique(index).tolist():
            members = index == position
            found[members] = self._rows_of(position, local[members])
        return torch.from_numpy(found)

    def close(self) -> None:
        for handle, _ in self._open.values():
            handle.close()
        self._open.clear()

    def __enter__(self) -> "TeacherRows":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def teacher_rows(teacher_path: str | Path, keys: "torch.Tensor") -> "torch.Tensor":
    """The teacher embeddings of ``keys`` (rows looked up by key in the sorted ``keys`` of the HDF5)."""
    with TeacherRows([teacher_path]) as lookup:
        return lookup.rows(keys)


def run_teacher_rows(teacher_paths: "list[str | Path]", keys: "torch.Tensor") -> "torch.Tensor":
    """The teacher embeddings of a run's ``keys`` with one teacher file per data set, in
    ``data.datasets`` order (:class:`TeacherRows`)."""
    with TeacherRows(teacher_paths) as lookup:
        return lookup.rows(keys)


def check_same_space(teacher_paths: "list[str | Path]") -> None:
    """The teacher files of several data sets must give features of one space: same model, same
    width, and no per-data-set PCA (each file's PCA is fitted to its own data set, a different basis)."""
    import h5py
    import numpy as np

    if len(teacher_paths) < 2:
        return
    described = []
    for path in teacher_paths:
        with h5py.File(path, "r") as f:
            components = f["pca_components"][:] if "pca_components" in f else None
            described.append((Path(path), _plain(f.attrs.get("model", "")), int(f["embeddings"].shape[1]), components))
    first_path, model, width, components = described[0]
    for path, other_model, other_width, other_components in described[1:]:
        if other_width != width:
            raise ProtoclipError(
                f"Teacher files {first_path} and {path} have {width} and {other_width} dimensions; embed every data "
                "set of data.datasets with the same model and --pca-dim."
            )
        if other_model != model:
            raise ProtoclipError(
                f"Teacher files {first_path} and {path} come from different models ({model}, {other_model}); embed "
                "every data set of data.datasets with the same model."
            )
        same_pca = (components is None and other_components is None) or (
            components is not None and other_components is not None and np.array_equal(components, other_components)
        )
        if not same_pca:
            raise ProtoclipError(
                f"Teacher files {first_path} and {path} were reduced by different PCAs (each fitted to its own data "
                "set), so their features are not comparable; embed the data sets with --pca-dim 0 to train them together."
            )


# -- checks --------------------------------------------------------------------------------------


def check_reusable(target: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """The attributes of a finished file made from the ``wanted`` identity (the keys of
    :data:`IDENTITY`); a file made otherwise is an error asking for ``--force``."""
    _, _, attrs = load_teacher(target, embeddings=False)
    differing = [key for key in IDENTITY if attrs.get(key) != wanted[key]]
    if differing:
        raise ProtoclipError(
            f"{target} was made with a different {', '.join(differing)} (e.g. {differing[0]}="
            f"{attrs.get(differing[0])!r}, wanted {wanted[differing[0]]!r}); pass --force to replace it."
        )
    return attrs


def same_dataset_version(teacher_path: Path, dataset_manifest_path: Path) -> bool:
    """Whether the teacher file was embedded from the data set as its manifest is now (the sha256
    the file recorded equals the manifest's). Another version (a new download, another seed, a
    repair that dropped samples) may hold other captions under the same keys."""
    _, _, attrs = load_teacher(teacher_path, embeddings=False)
    return attrs.get("dataset_manifest_sha256") == file_sha256(dataset_manifest_path)


def embedded_from(teacher_path: Path, dataset_manifest_path: Path, split: str, samples: int) -> bool:
    """True when the teacher file was embedded from this very download of the train split and holds
    one row per sample: then it covers the data and the shards need not be scanned for their keys."""
    keys, _, attrs = load_teacher(teacher_path, embeddings=False)
    return (
        split == "train"
        and len(keys) == samples
        and attrs.get("dataset_manifest_sha256") == file_sha256(dataset_manifest_path)
    )


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

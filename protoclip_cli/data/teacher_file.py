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
  (attribute ``normalisation``, :func:`~protoclip_cli.data.teacher_writer.apply_pca`);
- attributes describing the file (model, dimensions, normalisation, source data set and the sha256
  of its manifest, ...) and ``manifest``: the stage's manifest as JSON. The teacher folder holds one
  file per model, so the manifest lives inside the file rather than in a shared manifest.json.

Writing (resumable, its disk space reserved before HDF5 writes a row) is
:mod:`protoclip_cli.data.teacher_writer`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from protoclip_cli.artifacts import file_sha256
from protoclip_cli.data.sources import split_keys
from protoclip_cli.errors import MissingInputError, ProtoclipError

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

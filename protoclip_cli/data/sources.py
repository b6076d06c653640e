"""The data sets of a training run: which, with what weights, and sample keys unique across them.

A run trains on one data set (``data.dataset``) or on several together (``data.datasets = ["a",
"b"]``), each downloaded by ``protoclip download`` into ``<workspace>/datasets/<name>/`` with its own
teacher file ``datasets/<name>/teacher/<slug>.h5``. ``data.weights`` are OpenCLIP's upsampling
factors (``--train-data-upsampling-factors``, the ``::`` syntax of ``--train-data``): a data set of
weight 2 contributes its shards twice as often to the episodes as one of weight 1
(:func:`protoclip_cli.training.episodes.plan_episodes`). Weights are relative: only their ratios
count.

**Sample keys.** img2dataset numbers the samples of a data set (its shard number, then the index in
the shard), so two data sets share keys. Everything downstream joins on the key: teacher rows, the
cluster labels of ``prototypes.h5``, each sample's augmentation seed, the cluster report. A run over
several data sets therefore puts the data set's position in ``data.datasets`` in the key's high
digits::

    key = index * KEY_STRIDE + img2dataset key        KEY_STRIDE = 10**12

img2dataset's keys have as many digits as its shard count and its samples per shard together, 12 up
to a million shards of a million samples; a longer key is refused before training
(:meth:`RunDatasets.check_key_digits`). The first data set's keys, and so every one-data-set run's,
are img2dataset's own; :func:`split_keys` gives (data set index, img2dataset key) back.

**Shard ids.** The episode plan names shards by id: the file name (``00012.tar``) with one data set,
as before, ``<data set>/<file name>`` with several.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from protoclip_cli.configs.train import DataConfig
from protoclip_cli.data.shards import Sample, iter_key_stems, iter_samples
from protoclip_cli.errors import ProtoclipError

if TYPE_CHECKING:
    import numpy as np

    from protoclip_cli.workspace import Workspace

KEY_STRIDE = 10**12
KEY_DIGITS = 12


@dataclass(frozen=True)
class RunDatasets:
    """The data sets of a run in order (a data set's index is its position) and their weights."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def uniform(self) -> bool:
        return len(set(self.weights)) <= 1

    def shard_id(self, index: int, file_name: str) -> str:
        """How the episode plan names shard ``file_name`` of data set ``index``."""
        return file_name if len(self.names) == 1 else f"{self.names[index]}/{file_name}"

    def key_offset(self, index: int) -> int:
        return index * KEY_STRIDE

    def check_key_digits(self, index: int, shard: Path) -> None:
        """Refuse a data set whose img2dataset keys could reach the next data set's keys."""
        if len(self.names) == 1:
            return
        digits = len(next(iter_key_stems(shard), ""))
        if digits > KEY_DIGITS:
            raise ProtoclipError(
                f"Data set '{self.names[index]}' has {digits}-digit sample keys; training several data sets "
                f"together needs at most {KEY_DIGITS} (fewer shards or fewer samples per shard in `protoclip download`)."
            )


def run_datasets(data: DataConfig) -> RunDatasets:
    """The run's data sets: ``data.datasets`` when set, else ``data.dataset``; weights default to 1."""
    names = tuple(data.datasets) or (data.dataset,)
    weights = tuple(float(w) for w in data.weights) or (1.0,) * len(names)
    return RunDatasets(names, weights)


def split_keys(keys: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """(data set index, img2dataset key) of run keys (int64 arrays)."""
    import numpy as np

    keys = np.asarray(keys, dtype=np.int64)
    return keys // KEY_STRIDE, keys % KEY_STRIDE


def iter_run_samples(workspace: "Workspace", data: DataConfig, images: bool = True,
                     meta: bool = True) -> Iterator[Sample]:
    """The training split's samples of every data set of a run, keyed as the run keys them."""
    datasets = run_datasets(data)
    for index, name in enumerate(datasets.names):
        offset = datasets.key_offset(index)
        for sample in iter_samples(workspace.shards(name, data.split), images=images, meta=meta):
            sample.key += offset
            yield sample



"""The prototypes of an episode: k-means per modality, PBT centroids, labels by sample key.

Every rank clusters its own share of the episode's features (``core.kmeans`` all-reduces centroid
sums when the world size is > 1), PBT centroids are all-reduced means (``core.pbt``), and only the
per-sample labels are gathered so that every rank (and ``prototypes.h5``) can look labels up by key.

``runs/<run>/episodes/<n>/prototypes.h5`` (see docs/architecture.md): ``keys`` (n,) int64 sorted;
groups ``image``, ``text`` and, with a teacher, ``teacher``, each with ``labels`` (n,) int64 aligned
with ``keys`` and ``centroids`` (k, d) float32; PBT centroids ``image/in_text`` (P_img->txt),
``text/in_image`` (P_txt->img), ``teacher/in_image``, ``teacher/in_text``; root attributes
``episode``, ``k``, ``teacher_k``, ``objective_image``, ``objective_text``, ``objective_teacher``, and
in single-pass mode ``source_episode`` (the previous episode, whose recorded samples ``keys`` are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from protoclip_cli.artifacts import atomic_path
from protoclip_cli.core.distributed import is_distributed
from protoclip_cli.core.kmeans import kmeans
from protoclip_cli.core.losses import Prototypes
from protoclip_cli.core.pbt import cluster_means
from protoclip_cli.errors import ProtoclipError

if TYPE_CHECKING:
    from protoclip_cli.configs.train import ProtoConfig

MODALITIES = ("image", "text", "teacher")
# PBT centroids: (dataset name, clustering whose labels group the samples, feature space averaged).
PBT = (("image/in_text", "image", "text"), ("text/in_image", "text", "image"),
       ("teacher/in_image", "teacher", "image"), ("teacher/in_text", "teacher", "text"))


@dataclass
class EpisodePrototypes:
    """Labels (aligned with the sorted ``keys``), centroids and PBT centroids of one episode."""

    episode: int
    keys: np.ndarray
    labels: dict[str, np.ndarray]
    centroids: dict[str, np.ndarray]
    pbt: dict[str, np.ndarray]
    objectives: dict[str, float] = field(default_factory=dict)
    source_episode: int | None = None  # single-pass: the episode whose recorded samples were clustered

    @property
    def has_teacher(self) -> bool:
        return "teacher" in self.labels

    def lookup(self, batch_keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Labels of a batch by key: ``{"img", "txt"[, "ext"]}`` int64 tensors on the keys' device."""
        wanted = batch_keys.detach().cpu().numpy()
        rows = np.searchsorted(self.keys, wanted)
        rows = np.clip(rows, 0, len(self.keys) - 1)
        if not np.array_equal(self.keys[rows], wanted):
            missing = wanted[self.keys[rows] != wanted][0]
            raise ProtoclipError(
                f"Sample {missing} has no cluster label in episode {self.episode}'s prototypes; "
                "delete that episode's folder and rerun `protoclip train` to recluster it."
            )
        names = {"image": "img", "text": "txt", "teacher": "ext"}
        return {
            names[m]: torch.from_numpy(self.labels[m][rows]).to(batch_keys.device) for m in self.labels
        }

    def for_loss(self, device: torch.device):
        """The centroids as ``core.losses.Prototypes`` on ``device``."""
        def t(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)

        extra = {}
        if self.has_teacher:
            extra = {
                "ext_centroids": t(self.centroids["teacher"]),
                "ext_in_img": t(self.pbt["teacher/in_image"]),
                "ext_in_txt": t(self.pbt["teacher/in_text"]),
            }
        return Prototypes(
            img_centroids=t(self.centroids["image"]),
            txt_centroids=t(self.centroids["text"]),
            img_in_txt=t(self.pbt["image/in_text"]),
            txt_in_img=t(self.pbt["text/in_image"]),
            **extra,
        )

    def cluster_stats(self) -> dict[str, dict[str, float]]:
        """Per clustering: non-empty clusters, largest cluster, k-means objective."""
        stats = {}
        for modality, labels in self.labels.items():
            sizes = np.bincount(labels, minlength=len(self.centroids[modality]))
            stats[modality] = {
                "nonempty": int((sizes > 0).sum()),
                "max_size": int(sizes.max(initial=0)),
                "objective": float(self.objectives.get(modality, float("nan"))),
            }
        return stats


def _gather_labels(local_keys: torch.Tensor, local_labels: dict[str, torch.Tensor]) -> tuple[np.ndarray, dict]:
    part = (local_keys.cpu().numpy(), {m: v.cpu().numpy() for m, v in local_labels.items()})
    if is_distributed():
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    else:
        parts = [part]
    keys = np.concatenate([p[0] for p in parts]).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    labels = {m: np.concatenate([p[1][m] for p in parts]).astype(np.int64)[order] for m in local_labels}
    return keys[order], labels


def build_prototypes(
    episode: int, keys: torch.Tensor, features: dict[str, torch.Tensor], proto: "ProtoConfig", seed: int
) -> EpisodePrototypes:
    """Cluster this rank's ``features`` (``image``, ``text``, optional ``teacher``) and back-translate.

    ``features[m]`` are this rank's rows aligned with ``keys``; ``proto`` is the recipe's ``[proto]``
    section (``k``, ``teacher_k``, ``iterations``, ``restarts``, ``init``, ``backend``). Each
    clustering's seed derives from ``seed``, the episode and the modality. Returns the episode's
    prototypes with labels of all ranks' samples.
    """
    teacher_k = proto.teacher_k or proto.k
    clusters = {m: (teacher_k if m == "teacher" else proto.k) for m in MODALITIES if m in features}
    centroids: dict[str, np.ndarray] = {}
    labels: dict[str, torch.Tensor] = {}
    objectives: dict[str, float] = {}
    for offset, (modality, count) in enumerate(clusters.items()):
        result = kmeans(
            features[modality].float(),
            count,
            iterations=proto.iterations,
            restarts=proto.restarts,
            seed=seed + 7919 * episode + offset,
            backend=proto.backend,
            init=proto.init,
        )
        centroids[modality] = result.centroids.detach().float().cpu().numpy()
        labels[modality] = result.labels.to(features[modality].device)
        objectives[modality] = float(result.objective)
    pbt = {}
    for name, grouping, space in PBT:
        if grouping in labels:
            means = cluster_means(labels[grouping], features[space].float(), clusters[grouping])
            pbt[name] = means.detach().float().cpu().numpy()
    all_keys, all_labels = _gather_labels(keys, labels)
    return EpisodePrototypes(episode, all_keys, all_labels, centroids, pbt, objectives)


def save_prototypes(path: str | Path, prototypes: EpisodePrototypes) -> Path:
    """Write ``prototypes.h5`` atomically (format in the module docstring)."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("keys", data=prototypes.keys.astype(np.int64))
            for modality, labels in prototypes.labels.items():
                group = f.create_group(modality)
                group.create_dataset("labels", data=labels.astype(np.int64))
                group.create_dataset("centroids", data=prototypes.centroids[modality].astype(np.float32))
            for name, means in prototypes.pbt.items():
                f.create_dataset(name, data=means.astype(np.float32))
            f.attrs["episode"] = prototypes.episode
            f.attrs["k"] = len(prototypes.centroids["image"])
            f.attrs["teacher_k"] = len(prototypes.centroids["teacher"]) if prototypes.has_teacher else 0
            for modality in MODALITIES:
                f.attrs[f"objective_{modality}"] = prototypes.objectives.get(modality, float("nan"))
            if prototypes.source_episode is not None:
                f.attrs["source_episode"] = prototypes.source_episode
    return path


def load_prototypes(path: str | Path) -> EpisodePrototypes:
    """Read a ``prototypes.h5`` written by :func:`save_prototypes`."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ProtoclipError(f"{path} is missing; rerun `protoclip train --no-resume` to rebuild the run's episodes.")
    with h5py.File(path, "r") as f:
        modalities = [m for m in MODALITIES if m in f]
        labels = {m: f[m]["labels"][:] for m in modalities}
        centroids = {m: f[m]["centroids"][:] for m in modalities}
        pbt = {name: f[name][:] for name, grouping, _ in PBT if grouping in modalities}
        objectives = {m: float(f.attrs[f"objective_{m}"]) for m in modalities}
        source = int(f.attrs["source_episode"]) if "source_episode" in f.attrs else None
        return EpisodePrototypes(int(f.attrs["episode"]), f["keys"][:], labels, centroids, pbt, objectives, source)

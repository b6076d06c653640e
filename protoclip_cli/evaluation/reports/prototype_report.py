"""Inspection of an episode's prototypes (``prototypes.h5``, found by ``RunDir.pick_episode``): cluster sizes,
agreement between the clusterings, purity against ground truth, and the features its t-SNE map shows (the
figures are drawn by :mod:`protoclip_cli.evaluation.reports.plots`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from protoclip_cli.data.transforms import normalize
from protoclip_cli.errors import ProtoclipError

MODALITIES = ("image", "text", "teacher")


@dataclass
class EpisodeClusters:
    episode: int
    keys: np.ndarray  # (n,) int64 sorted
    labels: dict[str, np.ndarray]  # modality -> (n,) int64
    k: dict[str, int]  # modality -> number of centroids
    objectives: dict[str, float]


def read_episode(path: Path) -> EpisodeClusters:
    import h5py

    with h5py.File(path, "r") as f:
        modalities = [m for m in MODALITIES if m in f]
        labels = {m: f[m]["labels"][:].astype(np.int64) for m in modalities}
        k = {m: int(f[m]["centroids"].shape[0]) for m in modalities}
        objectives = {m: float(f.attrs.get(f"objective_{m}", float("nan"))) for m in modalities}
        return EpisodeClusters(int(f.attrs["episode"]), f["keys"][:].astype(np.int64), labels, k, objectives)


def ground_truth_of(samples: Iterable, keys: np.ndarray) -> tuple[np.ndarray, dict[int, dict]]:
    """(true label per key, ``{key: {"caption", "class_name"}}``) joined on the samples' keys."""
    wanted = set(int(k) for k in keys)
    found: dict[int, dict] = {}
    for sample in samples:
        if sample.key in wanted:
            found[sample.key] = {"caption": sample.caption, "label": sample.meta.get("label"),
                                 "class_name": sample.meta.get("class_name")}
    missing = [int(k) for k in keys if int(k) not in found]
    if missing:
        raise ProtoclipError(f"{len(missing)} keys of the episode (e.g. {missing[0]}) are not in the run's data set.")
    labels = np.asarray([found[int(k)]["label"] if found[int(k)]["label"] is not None else -1 for k in keys])
    return labels.astype(np.int64), found


@torch.no_grad()
def projected_features(model, images: list[torch.Tensor], device: torch.device, batch_size: int = 128) -> np.ndarray:
    """L2-normalised projected image features (the space k-means clustered) of eval-transformed uint8 images."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch = normalize(torch.stack(images[start : start + batch_size]), model.image_mean, model.image_std, device)
        raw = model.clip.encode_image(batch)
        projected = model.image_head(raw) if model.image_head is not None else raw
        parts.append(torch.nn.functional.normalize(projected.float(), dim=-1).cpu())
    return torch.cat(parts).numpy()

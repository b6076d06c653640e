"""Inspection of an episode's prototypes (``prototypes.h5``, found by ``RunDir.pick_episode``): cluster sizes,
agreement between the clusterings, purity against ground truth, image grids and a t-SNE map."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

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


def grid_png(path: Path, clusters: list[tuple[int, list[tuple[torch.Tensor, str]]]], title: str) -> Path:
    """Rows of sample images (uint8 (3, H, W)) with wrapped captions, one row per cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(samples) for _, samples in clusters)
    figure, axes = plt.subplots(len(clusters), columns, figsize=(1.9 * columns, 2.3 * len(clusters)), squeeze=False)
    for row, (cluster, samples) in enumerate(clusters):
        for col in range(columns):
            axis = axes[row][col]
            axis.axis("off")
            if col < len(samples):
                image, caption = samples[col]
                axis.imshow(image.permute(1, 2, 0).numpy())
                axis.set_title("\n".join(textwrap.wrap(caption, 24)[:3]), fontsize=6)
        axes[row][0].text(-0.1, 0.5, f"cluster {cluster}", transform=axes[row][0].transAxes, rotation=90,
                          va="center", ha="right", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def tsne_png(path: Path, features: np.ndarray, colourings: dict[str, np.ndarray], seed: int, title: str) -> Path:
    """A 2-D t-SNE of ``features``, one panel per colouring (the 20 largest groups in colour, others grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    figure, axes = plt.subplots(1, len(colourings), figsize=(5.5 * len(colourings), 5), squeeze=False)
    palette = plt.get_cmap("tab20")
    for axis, (name, labels) in zip(axes[0], colourings.items()):
        groups, counts = np.unique(labels, return_counts=True)
        largest = groups[np.argsort(-counts)][:20]
        axis.scatter(points[:, 0], points[:, 1], s=4, c="lightgrey")
        for i, group in enumerate(largest):
            member = labels == group
            axis.scatter(points[member, 0], points[member, 1], s=6, color=palette(i % 20))
        axis.set_title(f"coloured by {name}", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


@torch.no_grad()
def projected_features(model, images: list[torch.Tensor], device: torch.device, batch_size: int = 128) -> np.ndarray:
    """L2-normalised projected image features (the space k-means clustered) of eval-transformed uint8 images."""
    from protoclip_cli.data.transforms import normalize

    parts = []
    for start in range(0, len(images), batch_size):
        batch = normalize(torch.stack(images[start : start + batch_size]), model.image_mean, model.image_std, device)
        raw = model.clip.encode_image(batch)
        projected = model.image_head(raw) if model.image_head is not None else raw
        parts.append(torch.nn.functional.normalize(projected.float(), dim=-1).cpu())
    return torch.cat(parts).numpy()

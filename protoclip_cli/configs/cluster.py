"""``protoclip cluster``'s config: a run's prototypes report, or k-means of a feature file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protoclip_cli.config import check_choices, option, require


@dataclass(frozen=True)
class ClusterConfig:
    run: str = option("", "Run name, run folder or checkpoint file ('' = the workspace's latest run).")
    episode: str = option("last", "Episode to report on: 'last' or its number.")
    grid_clusters: int = option(6, "Clusters shown in each image grid (the largest ones).")
    grid_samples: int = option(8, "Samples per cluster in the grids.")
    tsne_points: int = option(1000, "Samples of the episode in the t-SNE map (0 = no map).")
    device: str = option("auto", "Device for recomputing the t-SNE features.")
    features: str = option("", "Cluster this HDF5 file's `embeddings` instead of reporting on a run.")
    k: int = option(0, "Clusters for --features.")
    backend: Literal["auto", "torch", "faiss"] = option("auto", "k-means backend for --features.")
    iterations: int = option(20, "k-means iterations for --features.")
    restarts: int = option(1, "k-means restarts for --features (the lowest objective is kept).")
    seed: int = option(0, "Seed of k-means, sampling and t-SNE.")
    out: str = option("", "Output: the report folder, or the labels/centroids HDF5 for --features.")

    def __post_init__(self) -> None:
        check_choices(self)
        require(
            self.episode == "last" or self.episode.isdigit(), f"--episode {self.episode} is neither 'last' nor a number."
        )
        require(not self.features or self.k >= 1, "--features needs --k, the number of clusters (e.g. --k 1000).")
        require(
            self.features or self.k == 0,
            f"--k {self.k} is read only with --features; a run's prototypes have the k of its recipe (proto.k).",
        )
        for name in ("iterations", "restarts", "grid_samples"):
            value = getattr(self, name)
            require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        for name in ("grid_clusters", "tsne_points"):
            value = getattr(self, name)
            require(value >= 0, f"--{name.replace('_', '-')} must be 0 (none) or more, got {value}.")

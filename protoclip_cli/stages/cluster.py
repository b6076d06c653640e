"""`cluster`: a report on a run's episode prototypes, or k-means of any stored features.

Report mode writes ``runs/<run>/cluster/episode-<n>/``: ``report.json`` (cluster sizes and empty
clusters per modality, AMI/ARI between the image, text and teacher clusterings, purity/ARI/AMI
against the ground truth when the data set has labels), ``grid-image.png`` / ``grid-text.png``
(sample images with captions of the largest clusters) and ``tsne.png`` (t-SNE of the projected
image features of a sample of the episode, recomputed with the run's latest checkpoint).

Features mode (``features`` set) clusters the ``embeddings`` of an HDF5 file (e.g. a teacher file)
and writes ``keys`` (when present), ``labels`` and ``centroids`` to ``<file>.kmeans-<k>.h5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protoclip_cli.artifacts import atomic_dir, atomic_path, write_json
from protoclip_cli.configs.cluster import ClusterConfig
from protoclip_cli.console import info
from protoclip_cli.core.distributed import resolve_device
from protoclip_cli.core.kmeans import kmeans
from protoclip_cli.core.run_model import load_run_model
from protoclip_cli.data.sources import iter_run_samples, run_datasets
from protoclip_cli.data.transforms import decode_image, eval_transform
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.reports import plots
from protoclip_cli.evaluation.reports import prototype_report as pr
from protoclip_cli.evaluation.tasks.clustering import (
    agreement,
    size_histogram,
    size_summary,
)
from protoclip_cli.workspace import Workspace, resolve


def run(config: ClusterConfig, workspace: Workspace) -> dict[str, Any]:
    """Report on an episode's prototypes, or cluster a feature file (``config.features``)."""
    if config.features:
        return cluster_feature_file(config)
    return report_episode(config, workspace)


# -- features mode ---------------------------------------------------------------------------------


def cluster_feature_file(config: ClusterConfig) -> dict[str, Any]:
    import h5py
    import numpy as np
    import torch

    source = Path(config.features)
    if not source.is_file():
        raise MissingInputError(f"Feature file {source} does not exist; pass an HDF5 file with an `embeddings` dataset.")
    with h5py.File(source, "r") as f:
        if "embeddings" not in f:
            raise ProtoclipError(f"{source} has no `embeddings` dataset (it has: {', '.join(f) or 'nothing'}).")
        embeddings = f["embeddings"][:].astype(np.float32)
        keys = f["keys"][:].astype(np.int64) if "keys" in f else None
    if config.k > len(embeddings):
        raise ProtoclipError(f"Cannot make {config.k} clusters of {len(embeddings)} rows; pass a smaller --k.")
    result = kmeans(torch.from_numpy(embeddings), config.k, iterations=config.iterations, restarts=config.restarts,
                    seed=config.seed, backend=config.backend, distributed=False)
    labels = result.labels.cpu().numpy().astype(np.int64)
    out = Path(config.out) if config.out else source.with_name(f"{source.stem}.kmeans-{config.k}.h5")
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            if keys is not None:
                f.create_dataset("keys", data=keys)
            f.create_dataset("labels", data=labels)
            f.create_dataset("centroids", data=result.centroids.cpu().numpy().astype(np.float32))
            f.attrs.update({"k": config.k, "objective": result.objective, "source": str(source),
                            "backend": config.backend, "iterations": config.iterations,
                            "restarts": config.restarts, "seed": config.seed})
    summary = {key: value for key, value in size_summary(labels, config.k).items() if key != "sizes"}
    return {"stage": "cluster", "mode": "features", "source": str(source), "out": str(out),
            "objective": result.objective, "sizes": summary, "files": [str(out)]}


# -- report mode -----------------------------------------------------------------------------------


def report_episode(config: ClusterConfig, workspace: Workspace) -> dict[str, Any]:
    import numpy as np

    resolved = resolve(workspace, config.run)
    run, workspace = resolved.run, resolved.workspace
    train_config = run.config()
    number, h5_path = run.pick_episode(config.episode)
    episode = pr.read_episode(h5_path)
    # The run's keys: with several data sets, each data set's index is in its keys' high digits.
    def run_samples(images: bool, meta: bool):
        return iter_run_samples(workspace, train_config.data, images=images, meta=meta)

    has_truth = all("ground_truth" in workspace.dataset_manifest(name) for name in run_datasets(train_config.data).names)
    truth, samples = pr.ground_truth_of(run_samples(False, True), episode.keys)
    info(f"Episode {number} of {run.name}: {len(episode.keys)} samples, clusterings: {', '.join(episode.labels)}.")

    report: dict[str, Any] = {"run": run.name, "episode": number, "samples": int(len(episode.keys)),
                              "source": str(h5_path), "modalities": {}, "agreement": {}, "ground_truth": {}}
    for modality, labels in episode.labels.items():
        summary = size_summary(labels, episode.k[modality])
        report["modalities"][modality] = {**summary, "histogram": size_histogram(np.asarray(summary["sizes"])),
                                          "objective": episode.objectives[modality]}
    names = list(episode.labels)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            scores = agreement(episode.labels[first], episode.labels[second])
            report["agreement"][f"{first}-{second}"] = {"ami": scores["ami"], "ari": scores["ari"]}
    if has_truth and (truth >= 0).all():
        for modality, labels in episode.labels.items():
            report["ground_truth"][modality] = agreement(labels, truth)

    out_dir = Path(config.out) if config.out else run.cluster_dir(number)
    with atomic_dir(out_dir) as tmp:
        files = _figures(config, resolved, episode, run_samples, samples, truth if has_truth else None, tmp)
        report["files"] = [str(out_dir / name) for name in [*files, "report.json"]]
        write_json(tmp / "report.json", report)
    return {"stage": "cluster", "mode": "report", "out": str(out_dir), **report}


def _figures(config, resolved, episode, run_samples, samples, truth, folder: Path) -> list[str]:
    """Grids of the largest image and text clusters, and the t-SNE map; returns the file names."""
    import numpy as np
    import torch

    rng = np.random.default_rng(config.seed)
    shown: dict[str, list[tuple[int, "np.ndarray"]]] = {}
    for modality in ("image", "text"):
        if modality not in episode.labels or config.grid_clusters < 1:
            continue
        labels = episode.labels[modality]
        sizes = np.bincount(labels, minlength=episode.k[modality])
        shown[modality] = [(int(c), rng.permutation(np.flatnonzero(labels == c))[: config.grid_samples])
                           for c in np.argsort(-sizes, kind="stable")[: config.grid_clusters] if sizes[c] > 0]
    tsne_rows = rng.permutation(len(episode.keys))[: config.tsne_points] if config.tsne_points > 1 else np.array([], int)
    wanted = {int(episode.keys[r]) for rows in shown.values() for _, members in rows for r in members}
    wanted |= {int(episode.keys[r]) for r in tsne_rows}

    model, train_config, checkpoint = (None, None, None)
    if len(tsne_rows) > 1:
        device = resolve_device(config.device)
        model, train_config, checkpoint = load_run_model(resolved.run, resolved.checkpoint, device=str(device))
    transform = eval_transform(model.image_size if model is not None else 64)
    images: dict[int, torch.Tensor] = {}
    for sample in run_samples(True, False):
        if sample.key in wanted and sample.image is not None:
            images[sample.key] = decode_image(sample.image)
    files = []
    for modality, rows in shown.items():
        clusters = [(c, [(images[int(episode.keys[r])], samples[int(episode.keys[r])]["caption"]) for r in members])
                    for c, members in rows]
        name = f"grid-{modality}.png"
        plots.grid_png(folder / name, clusters, f"{resolved.run.name} episode {episode.episode}: largest {modality} clusters")
        files.append(name)
    if model is not None:
        keys = [int(episode.keys[r]) for r in tsne_rows]
        features = pr.projected_features(model, [transform(images[k]) for k in keys], device)
        colourings = {"image cluster": episode.labels["image"][tsne_rows]}
        if truth is not None:
            colourings["ground-truth class"] = truth[tsne_rows]
        elif "text" in episode.labels:
            colourings["text cluster"] = episode.labels["text"][tsne_rows]
        plots.tsne_png(folder / "tsne.png", features, colourings, config.seed,
                    f"t-SNE of projected image features ({Path(checkpoint['path']).name})")
        files.append("tsne.png")
    return files

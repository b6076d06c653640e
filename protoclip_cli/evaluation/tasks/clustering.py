"""Clustering quality against ground truth (ARI, AMI, purity) and cluster size summaries; the
clustering task (:func:`evaluate`), which scores k-means of a model's image features."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protoclip_cli.core.kmeans import kmeans
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.tasks.features import image_features
from protoclip_cli.evaluation.tasks.model import EvalModel
from protoclip_cli.evaluation.tasks.percent import percent


def purity(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of samples whose cluster's most frequent true label is their own label."""
    predicted = np.asarray(predicted)
    truth = np.asarray(truth)
    if predicted.shape != truth.shape or predicted.size == 0:
        raise ValueError("purity needs two non-empty label arrays of the same length")
    _, cluster = np.unique(predicted, return_inverse=True)
    _, label = np.unique(truth, return_inverse=True)
    counts = np.zeros((cluster.max() + 1, label.max() + 1), dtype=np.int64)
    np.add.at(counts, (cluster, label), 1)
    return float(counts.max(axis=1).sum() / predicted.size)


def agreement(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """``ari``, ``ami`` (scikit-learn, arithmetic normalisation) and ``purity`` of two labelings."""
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    return {
        "ari": float(adjusted_rand_score(truth, predicted)),
        "ami": float(adjusted_mutual_info_score(truth, predicted)),
        "purity": purity(predicted, truth),
    }


# The clustering task's k-means: this project's default, and the reference's (niter=100, nredo=5 in
# clustering_evaluation of megvii-research/protoclip src/training/evaluations/zero_shot.py).
PROTOCOLS = {"default": {"iterations": 50, "restarts": 3}, "reference": {"iterations": 100, "restarts": 5}}


def reference_kmeans_labels(features: np.ndarray, k: int) -> np.ndarray:
    """Cluster labels as the reference's ``clustering_evaluation`` makes them: ``faiss.Kmeans(d, k,
    niter=100, nredo=5)`` with faiss's other defaults (seed 1234, training on a random sample of at
    most 256 points per centroid), then every point's nearest centroid. The reference ran faiss on a
    GPU; here faiss runs on a GPU when its build has one."""
    import faiss

    points = np.ascontiguousarray(features, dtype=np.float32)
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    model = faiss.Kmeans(points.shape[1], int(k), niter=PROTOCOLS["reference"]["iterations"],
                         nredo=PROTOCOLS["reference"]["restarts"], verbose=False, gpu=gpu)
    model.train(points)
    _, nearest = model.index.search(points, 1)
    return nearest[:, 0].astype(np.int64)


def evaluate(
    model: EvalModel, data: ImageSet, k: int, cache_dir: Path | None, batch_size: int, workers: int, seed: int,
    protocol: str = "default", figures: dict | None = None,
) -> dict:
    """k-means of the normalised image features against the ground-truth classes: ARI, AMI, purity.

    ``protocol="default"``: this package's k-means, 50 iterations, 3 restarts; ``"reference"``: the
    ProtoCLIP reference's faiss k-means, 100 iterations, 5 restarts (:func:`reference_kmeans_labels`).
    """
    labels = data.require_labels("clustering evaluation")
    k = k or len(data.classnames)
    if k > data.size:
        raise ProtoclipError(f"Cannot make {k} clusters of {data.size} images; pass a smaller --clusters.")
    features = image_features(model, data, cache_dir, batch_size, workers)
    settings = PROTOCOLS[protocol]
    if protocol == "reference":
        predicted = reference_kmeans_labels(features.numpy(), k)
    else:
        result = kmeans(features.to(model.device), k, iterations=settings["iterations"],
                        restarts=settings["restarts"], seed=seed, distributed=False)
        predicted = result.labels.cpu().numpy()
    scores = agreement(predicted, labels)
    if figures is not None:
        figures.update(features=features, labels=labels, clusters=predicted)
    return {
        "metrics": {"ari": scores["ari"], "ami": scores["ami"], "purity": percent(scores["purity"])},
        "images": data.size,
        "k": k,
        "classes": len(data.classnames),
        "protocol": protocol,
        "iterations": settings["iterations"],
        "restarts": settings["restarts"],
    }


def size_summary(labels: np.ndarray, k: int) -> dict:
    """Sizes of the ``k`` clusters (``sizes[j]`` = members of cluster j), empty count and spread."""
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    if sizes.shape[0] > k:
        raise ValueError(f"labels reach {sizes.shape[0] - 1} but k = {k}")
    non_empty = sizes[sizes > 0]
    return {
        "k": int(k),
        "n": int(sizes.sum()),
        "empty": int((sizes == 0).sum()),
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "mean": float(sizes.mean()),
        "median_non_empty": float(np.median(non_empty)) if non_empty.size else 0.0,
        "sizes": sizes.tolist(),
    }


def size_histogram(sizes: np.ndarray, bins: int = 10) -> list[dict]:
    """Histogram of cluster sizes: ``[{"from": a, "to": b, "clusters": c}, ...]`` with integer edges."""
    sizes = np.asarray(sizes)
    top = int(sizes.max()) if sizes.size else 0
    edges = np.unique(np.linspace(0, top + 1, bins + 1).round().astype(np.int64))
    counts, _ = np.histogram(sizes, bins=edges)
    return [
        {"from": int(lo), "to": int(hi) - 1, "clusters": int(c)} for lo, hi, c in zip(edges[:-1], edges[1:], counts)
    ]

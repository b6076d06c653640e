"""Clustering quality against ground truth (ARI, AMI, purity) and cluster size summaries."""

from __future__ import annotations

import numpy as np


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

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

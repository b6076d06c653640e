"""The evaluation tasks: each takes a model and its data, and returns a dict of metrics (in %
for accuracies and recalls) plus counts, ready to be written as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from protoclip_cli.core.kmeans import kmeans
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.data.prompts import imagenet_templates
from protoclip_cli.evaluation.tasks.clustering import (
    PROTOCOLS,
    agreement,
    reference_kmeans_labels,
)
from protoclip_cli.evaluation.tasks.features import image_features, text_features
from protoclip_cli.evaluation.tasks.linear_probe import linear_probe as fit_and_score
from protoclip_cli.evaluation.tasks.linear_probe import reference_linear_probe
from protoclip_cli.evaluation.tasks.modality_gap import modality_gap as gap
from protoclip_cli.evaluation.tasks.model import EvalModel
from protoclip_cli.evaluation.tasks.retrieval import retrieval_recall
from protoclip_cli.evaluation.tasks.zeroshot import (
    class_embeddings,
    prompts_for,
    topk_accuracy,
    zeroshot_scores,
)


def _percent(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(100.0 * v, 4) for k, v in metrics.items()}


def _require_labels(data: ImageSet, task: str) -> np.ndarray:
    if data.labels is None or data.classnames is None:
        raise ProtoclipError(f"Data set {data.name} has no class labels; {task} needs a labelled data set.")
    return data.labels


TOPK_CURVE = 10  # the zero-shot top-k curve goes up to k = 10 (or the number of classes)


def zeroshot(
    model: EvalModel, data: ImageSet, templates: Sequence | None, cache_dir: Path | None, batch_size: int, workers: int,
    figures: dict | None = None,
) -> dict:
    """Top-1/top-5 accuracy of classifying ``data`` by its class names put into ``templates``, the
    top-k curve, and (into ``figures``, when given) the image features, labels and class scores."""
    labels = _require_labels(data, "zero-shot classification")
    source = "file" if templates else ("dataset" if data.templates else "openai-imagenet")
    templates = list(templates or data.templates or imagenet_templates())
    prompts = [p for per_class in prompts_for(data.classnames, templates) for p in per_class]
    images = image_features(model, data, cache_dir, batch_size, workers)
    prompt_features = text_features(model, prompts, f"{data.name}-prompts", cache_dir)
    classes = class_embeddings(lambda texts: prompt_features, data.classnames, templates)
    metrics = _percent(zeroshot_scores(images, classes, torch.from_numpy(labels), ks=(1, 5)))
    scores = torch.nn.functional.normalize(images.float(), dim=-1) @ torch.nn.functional.normalize(classes.float(), dim=-1).T
    curve = topk_accuracy(scores, torch.from_numpy(labels), ks=range(1, min(TOPK_CURVE, len(data.classnames)) + 1))
    if figures is not None:
        figures.update(features=images, labels=labels, scores=scores)
    return {
        "metrics": metrics,
        "topk_curve": {k[3:]: v for k, v in _percent(curve).items()},
        "images": data.size,
        "classes": len(data.classnames),
        "templates": len(templates),
        # file: --templates; dataset: the data set's own (CIFAR/STL-10: OpenAI CLIP's, ImageNet: the 80);
        # openai-imagenet: the 80 ImageNet templates, for a data set without its own.
        "templates_from": source,
        "chance_top1": round(100.0 / len(data.classnames), 4),
    }


def linear_probe(
    model: EvalModel,
    train: ImageSet,
    test: ImageSet,
    cache_dir: Path | None,
    batch_size: int,
    workers: int,
    method: str,
    weight_decays: Sequence[float],
    seed: int,
    protocol: str = "default",
) -> dict:
    """Top-1 of logistic regression on frozen image features.

    ``protocol="default"``: normalised features, weight decay chosen on a validation split of train,
    refit, scored once on test. ``"reference"``: the ProtoCLIP reference's SGD probe on the raw
    features, best test top-1 over its 100 epochs (see :func:`reference_linear_probe`).
    """
    train_y = torch.from_numpy(_require_labels(train, "the linear probe"))
    test_y = torch.from_numpy(_require_labels(test, "the linear probe"))
    if len(train.classnames) != len(test.classnames):
        raise ProtoclipError(
            f"Train ({train.name}) has {len(train.classnames)} classes but test ({test.name}) has "
            f"{len(test.classnames)}; both splits need the same class folders."
        )
    normalized = protocol != "reference"  # the reference probes the raw image tower outputs
    train_x = image_features(model, train, cache_dir, batch_size, workers, normalized=normalized).to(model.device)
    test_x = image_features(model, test, cache_dir, batch_size, workers, normalized=normalized).to(model.device)
    common = {"train_images": int(train_x.shape[0]), "test_images": int(test_x.shape[0]),
              "classes": len(train.classnames), "protocol": protocol,
              "chance_top1": round(100.0 / len(train.classnames), 4)}
    if protocol == "reference":
        ref = reference_linear_probe(train_x, train_y, test_x, test_y, seed=seed)
        return {
            "metrics": {"top1": round(100.0 * ref.top1, 4)},
            "method": "sgd", "features": "raw", "epochs": ref.epochs, "best_epoch": ref.best_epoch,
            "test_top1_per_epoch": [round(100.0 * v, 4) for v in ref.test_top1],
            "selection": "best test top-1 over the epochs (the reference's; not a held-out estimate)",
            **common,
        }
    result = fit_and_score(train_x, train_y, test_x, test_y, weight_decays=weight_decays, method=method, seed=seed)
    metrics = {"top1": result.top1, "mean_per_class_recall": result.mean_per_class_recall}
    if result.top5 is not None:
        metrics["top5"] = result.top5
    return {
        "metrics": _percent(metrics),
        "weight_decay": result.weight_decay,
        "validation_top1": {str(wd): round(100.0 * v, 4) for wd, v in result.validation_top1.items()},
        "method": method,
        "features": "normalised",
        "selection": "weight decay on a 20% validation split of train, refit, scored once on test",
        **common,
    }


def _pairs(model: EvalModel, data: ImageSet, cache_dir: Path | None, batch_size: int, workers: int):
    texts, owners = data.caption_owners()
    images = image_features(model, data, cache_dir, batch_size, workers)
    captions = text_features(model, texts, f"{data.name}-captions", cache_dir)
    return images, captions, owners


def retrieval(
    model: EvalModel, data: ImageSet, cache_dir: Path | None, batch_size: int, workers: int, figures: dict | None = None
) -> dict:
    """Image-text recall@1/5/10 both ways and their mean (features into ``figures``, when given)."""
    images, captions, owners = _pairs(model, data, cache_dir, batch_size, workers)
    if figures is not None:
        figures.update(features=images, captions=captions, owners=owners)
    return {
        "metrics": _percent(retrieval_recall(images, captions, owners, ks=(1, 5, 10))),
        "images": data.size,
        "captions": int(owners.numel()),
    }


def modality_gap(model: EvalModel, data: ImageSet, cache_dir: Path | None, batch_size: int, workers: int) -> dict:
    """Distance between the modality means, and the mean cosine of matching pairs."""
    images, captions, owners = _pairs(model, data, cache_dir, batch_size, workers)
    return {"metrics": gap(images, captions, owners), "images": data.size, "captions": int(owners.numel())}


def clustering(
    model: EvalModel, data: ImageSet, k: int, cache_dir: Path | None, batch_size: int, workers: int, seed: int,
    protocol: str = "default", figures: dict | None = None,
) -> dict:
    """k-means of the normalised image features against the ground-truth classes: ARI, AMI, purity.

    ``protocol="default"``: this package's k-means, 50 iterations, 3 restarts; ``"reference"``: the
    ProtoCLIP reference's faiss k-means, 100 iterations, 5 restarts (:func:`reference_kmeans_labels`).
    """
    labels = _require_labels(data, "clustering evaluation")
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
        "metrics": {"ari": scores["ari"], "ami": scores["ami"], "purity": round(100.0 * scores["purity"], 4)},
        "images": data.size,
        "k": k,
        "classes": len(data.classnames),
        "protocol": protocol,
        "iterations": settings["iterations"],
        "restarts": settings["restarts"],
    }

"""Zero-shot classification with class embeddings built from prompt templates: the task
(:func:`evaluate`) and its math on feature tensors.

A class embedding is the L2-normalised mean of the L2-normalised embeddings of the class name put
into every template (the OpenAI / ProtoCLIP evaluation protocol). Top-k accuracy counts ties
against the model: a sample is correct at k when fewer than k *other* classes score greater than
*or equal to* its true class, so a degenerate model that gives every class the same score gets 0,
never 100%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.data.prompts import imagenet_templates
from protoclip_cli.evaluation.tasks.features import image_features, text_features
from protoclip_cli.evaluation.tasks.model import EvalModel
from protoclip_cli.evaluation.tasks.percent import percents

Template = Union[str, Callable[[str], str]]
TOPK_CURVE = 10  # the zero-shot top-k curve goes up to k = 10 (or the number of classes)


def format_prompt(template: Template, classname: str) -> str:
    """Put ``classname`` into ``template``: a ``"... {} ..."`` string or a callable (open_clip's)."""
    return template(classname) if callable(template) else template.format(classname)


def prompts_for(classnames: Sequence[str], templates: Sequence[Template]) -> list[list[str]]:
    """One list of prompts per class, in template order."""
    return [[format_prompt(t, name) for t in templates] for name in classnames]


@torch.no_grad()
def class_embeddings(
    encode_texts: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
) -> torch.Tensor:
    """(classes, dim) float32: normalised mean of the normalised template embeddings of each class.

    ``encode_texts`` maps a list of prompts to their (n, dim) features (it may batch internally).
    """
    prompts = prompts_for(classnames, templates)
    flat = [p for per_class in prompts for p in per_class]
    features = F.normalize(encode_texts(flat).float(), dim=-1)
    features = features.view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def true_class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n,) number of other classes scoring >= the true class (0 = the true class wins outright)."""
    true_scores = logits.gather(1, labels.view(-1, 1))
    at_least = (logits >= true_scores).sum(dim=1)
    return at_least - 1  # the true class itself is always counted once


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` in [0, 1]; ks larger than the number of classes are skipped."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} score rows but {labels.shape[0]} labels")
    rank = true_class_rank(logits, labels.long())
    return {f"top{k}": float((rank < k).float().mean()) for k in ks if k <= logits.shape[1]}


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced top-1 accuracy in [0, 1]: the mean, over the classes that occur in ``labels``, of the
    fraction of their samples ranked first (ties against the model, as in :func:`topk_accuracy`);
    CLIP_benchmark's ``mean_per_class_recall``."""
    labels = labels.long().to(logits.device)
    correct = (true_class_rank(logits, labels) == 0).double()
    present, inverse = torch.unique(labels, return_inverse=True)
    hits = torch.zeros(len(present), dtype=torch.float64, device=logits.device).index_add_(0, inverse, correct)
    counts = torch.bincount(inverse, minlength=len(present)).double()
    return float((hits / counts).mean())


def zeroshot_scores(
    image_features: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy and the mean per-class recall of cosine-similarity classification of
    ``image_features`` by ``class_embeds``."""
    logits = F.normalize(image_features.float(), dim=-1) @ F.normalize(class_embeds.float(), dim=-1).T
    return {**topk_accuracy(logits, labels, ks), "mean_per_class_recall": mean_per_class_recall(logits, labels)}


def templates_for(data: ImageSet, templates: Sequence | None) -> tuple[list, str]:
    """The templates zero-shot uses on ``data`` and where they come from: ``templates`` (``file``:
    --templates), the data set's own (``dataset``) or the 80 ImageNet ones (``openai-imagenet``)."""
    source = "file" if templates else ("dataset" if data.templates else "openai-imagenet")
    return list(templates or data.templates or imagenet_templates()), source


def evaluate(
    model: EvalModel, data: ImageSet, templates: Sequence | None, cache_dir: Path | None, batch_size: int, workers: int,
    figures: dict | None = None,
) -> dict:
    """Top-1/top-5 accuracy of classifying ``data`` by its class names put into ``templates``, the
    top-k curve, and (into ``figures``, when given) the image features, labels and class scores."""
    labels = data.require_labels("zero-shot classification")
    templates, source = templates_for(data, templates)
    prompts = [p for per_class in prompts_for(data.classnames, templates) for p in per_class]
    images = image_features(model, data, cache_dir, batch_size, workers)
    prompt_features = text_features(model, prompts, f"{data.name}-prompts", cache_dir)
    classes = class_embeddings(lambda texts: prompt_features, data.classnames, templates)
    metrics = percents(zeroshot_scores(images, classes, torch.from_numpy(labels), ks=(1, 5)))
    scores = F.normalize(images.float(), dim=-1) @ F.normalize(classes.float(), dim=-1).T
    curve = topk_accuracy(scores, torch.from_numpy(labels), ks=range(1, min(TOPK_CURVE, len(data.classnames)) + 1))
    if figures is not None:
        figures.update(features=images, labels=labels, scores=scores)
    return {
        "metrics": metrics,
        "topk_curve": {k[3:]: v for k, v in percents(curve).items()},
        "images": data.size,
        "classes": len(data.classnames),
        "templates": len(templates),
        # file: --templates; dataset: the data set's own (CIFAR/STL-10: OpenAI CLIP's, ImageNet: the 80);
        # openai-imagenet: the 80 ImageNet templates, for a data set without its own.
        "templates_from": source,
        "chance_top1": round(100.0 / len(data.classnames), 4),
    }

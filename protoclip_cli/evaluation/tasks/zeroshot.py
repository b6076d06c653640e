"""Zero-shot classification with class embeddings built from prompt templates.

A class embedding is the L2-normalised mean of the L2-normalised embeddings of the class name put
into every template (the OpenAI / ProtoCLIP evaluation protocol). Top-k accuracy counts ties
against the model: a sample is correct at k when fewer than k *other* classes score greater than
*or equal to* its true class, so a degenerate model that gives every class the same score gets 0,
never 100%.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

Template = Union[str, Callable[[str], str]]


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

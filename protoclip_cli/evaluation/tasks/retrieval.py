"""Image-text retrieval recall with several captions per image: the task (:func:`evaluate`) and
its math on feature tensors.

``text_image[t]`` is the index of the image that caption ``t`` describes. Image -> text: an image
is found at k when one of its captions ranks in the top k of all captions. Text -> image: a
caption is found at k when its image ranks in the top k of all images. Ties count against the
model, as in :mod:`protoclip_cli.evaluation.tasks.zeroshot`: the rank of the right answer is the number
of wrong answers scoring greater than or equal to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.tasks.features import pair_features
from protoclip_cli.evaluation.tasks.model import EvalModel
from protoclip_cli.evaluation.tasks.percent import percents

CHUNK = 4096  # rows of the similarity matrix held at once (COCO: 5K x 25K fits either way)


def _image_to_text_rank(sims: torch.Tensor, text_image: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    own = text_image.view(1, -1) == image_ids.view(-1, 1)  # (images, texts)
    best_own = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
    return ((sims >= best_own) & ~own).sum(dim=1)


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k in [0, 1] both ways (``image_to_text_R@k``, ``text_to_image_R@k``) and their
    ``mean_recall``, from cosine similarities of the (re-normalised) features."""
    n_images = image_features.shape[0]
    text_image = text_image.long().to(image_features.device)
    if text_image.shape[0] != text_features.shape[0]:
        raise ValueError(f"{text_features.shape[0]} captions but {text_image.shape[0]} caption owners")
    if text_image.numel() and (text_image.min() < 0 or text_image.max() >= n_images):
        raise ValueError("a caption points at an image index out of range")
    if torch.bincount(text_image, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption")
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)

    i2t_rank = torch.empty(n_images, dtype=torch.long, device=images.device)
    for start in range(0, n_images, CHUNK):
        ids = torch.arange(start, min(start + CHUNK, n_images), device=images.device)
        i2t_rank[ids] = _image_to_text_rank(images[ids] @ texts.T, text_image, ids)

    t2i_rank = torch.empty(texts.shape[0], dtype=torch.long, device=images.device)
    for start in range(0, texts.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        sims = texts[rows] @ images.T  # (texts, images)
        own = sims.gather(1, text_image[rows].view(-1, 1))
        t2i_rank[rows] = (sims >= own).sum(dim=1) - 1

    result = {}
    for k in ks:
        result[f"image_to_text_R@{k}"] = float((i2t_rank < k).float().mean())
    for k in ks:
        result[f"text_to_image_R@{k}"] = float((t2i_rank < k).float().mean())
    result["mean_recall"] = sum(result.values()) / len(result)
    return result


def evaluate(
    model: EvalModel, data: ImageSet, cache_dir: Path | None, batch_size: int, workers: int, figures: dict | None = None
) -> dict:
    """Image-text recall@1/5/10 both ways and their mean (features into ``figures``, when given)."""
    images, captions, owners = pair_features(model, data, cache_dir, batch_size, workers)
    if figures is not None:
        figures.update(features=images, captions=captions, owners=owners)
    return {
        "metrics": percents(retrieval_recall(images, captions, owners, ks=(1, 5, 10))),
        "images": data.size,
        "captions": int(owners.numel()),
    }

"""The modality gap between image and text tower features (Liang et al., 2022): the task
(:func:`evaluate`) and its math on feature tensors."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.tasks.features import pair_features
from protoclip_cli.evaluation.tasks.model import EvalModel


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """``gap`` = ||mean(normalised image features) - mean(normalised text features)||, and
    ``pair_cosine`` = mean cosine similarity of each caption with its own image
    (``text_image[t]`` = index of caption t's image)."""
    images = F.normalize(image_features.double(), dim=-1)
    texts = F.normalize(text_features.double(), dim=-1)
    gap = (images.mean(dim=0) - texts.mean(dim=0)).norm()
    pair_cosine = (texts * images[text_image.long()]).sum(dim=1).mean()
    return {"gap": float(gap), "pair_cosine": float(pair_cosine)}


def evaluate(model: EvalModel, data: ImageSet, cache_dir: Path | None, batch_size: int, workers: int) -> dict:
    """Distance between the modality means, and the mean cosine of matching pairs."""
    images, captions, owners = pair_features(model, data, cache_dir, batch_size, workers)
    return {"metrics": modality_gap(images, captions, owners), "images": data.size, "captions": int(owners.numel())}

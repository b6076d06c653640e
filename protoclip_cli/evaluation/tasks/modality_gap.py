"""The modality gap between image and text tower features (Liang et al., 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """``gap`` = ||mean(normalised image features) - mean(normalised text features)||, and
    ``pair_cosine`` = mean cosine similarity of each caption with its own image
    (``text_image[t]`` = index of caption t's image)."""
    images = F.normalize(image_features.double(), dim=-1)
    texts = F.normalize(text_features.double(), dim=-1)
    gap = (images.mean(dim=0) - texts.mean(dim=0)).norm()
    pair_cosine = (texts * images[text_image.long()]).sum(dim=1).mean()
    return {"gap": float(gap), "pair_cosine": float(pair_cosine)}

"""What every evaluation task is given: an :class:`ImageSet`, the images of a data set with their
labels or captions, whichever reader made it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data.fingerprint import fingerprint
from protoclip_cli.evaluation.data.images import Source, SourceImages


@dataclass
class ImageSet:
    """Images to extract features from, with what the tasks compare them to.

    ``images(transform)`` returns a torch data set yielding ``(row, uint8 (3, H, W))``: a
    map-style one for files and arrays, an iterable one for shards (rows come from sample keys).
    ``captions[i]`` lists the captions of image ``i`` (retrieval); ``labels[i]`` indexes
    ``classnames`` (classification and clustering). ``fingerprint`` is the data's identity in the
    feature cache (:mod:`protoclip_cli.evaluation.data.fingerprint`).
    """

    name: str
    fingerprint: str
    size: int
    images: Callable[[Callable], Dataset]
    labels: np.ndarray | None = None
    classnames: list[str] | None = None
    templates: list | None = None
    captions: list[list[str]] | None = None
    keys: np.ndarray | None = None  # sample keys of shard sources, row order
    details: dict = field(default_factory=dict)

    def require_labels(self, task: str) -> np.ndarray:
        """The labels, or a one-sentence error naming ``task``, which needs them."""
        if self.labels is None or self.classnames is None:
            raise ProtoclipError(f"Data set {self.name} has no class labels; {task} needs a labelled data set.")
        return self.labels

    def caption_owners(self) -> tuple[list[str], torch.Tensor]:
        """(flat list of captions, index of each caption's image)."""
        if self.captions is None:
            raise ProtoclipError(f"Data set {self.name} has no captions; retrieval needs image-text pairs.")
        texts = [c for per_image in self.captions for c in per_image]
        owners = torch.tensor([i for i, per_image in enumerate(self.captions) for _ in per_image], dtype=torch.long)
        return texts, owners


def source_set(name: str, sources: list[Source], details: dict, **fields) -> ImageSet:
    """An :class:`ImageSet` of images in files or tar members, known by those files (and, for tar
    members, their byte ranges)."""
    files = list(dict.fromkeys(path for path, _, _ in sources))
    members = [(offset, size) for _, offset, size in sources if size >= 0]
    return ImageSet(name=name, fingerprint=fingerprint(files, *([members] if members else [])), size=len(sources),
                    images=lambda transform: SourceImages(sources, transform), details=details, **fields)  # fmt: skip

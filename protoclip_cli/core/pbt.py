"""Prototypical Back Translation: the centroids of one clustering measured in another space.

The centroid of text cluster j in image space is the mean of the image features of the samples
whose text label is j (and symmetrically for image and teacher clusters). Targets built this way
live in the student's own space, which keeps the prototype loss robust to the modality gap.
"""

from __future__ import annotations

import torch

from protoclip_cli.core import distributed as dist_utils
from protoclip_cli.errors import ProtoclipError


def cluster_means(
    labels: torch.Tensor, features: torch.Tensor, k: int, distributed: bool | None = None
) -> torch.Tensor:
    """Mean of ``features`` (n, d) per label in ``labels`` (n,), as a (k, d) float32 tensor.

    Means are not re-normalised; clusters without members get zero vectors. With
    ``distributed=None`` the sums and counts are all-reduced whenever torch.distributed runs
    with more than one rank, so each rank passes only its own samples and all get the same result.
    """
    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ProtoclipError(
            f"Back-translation needs one label per feature row, got labels {tuple(labels.shape)} and "
            f"features {tuple(features.shape)}."
        )
    if k < 1:
        raise ProtoclipError(f"Back-translation needs k of at least 1, got {k}.")
    use_distributed = dist_utils.is_distributed() if distributed is None else bool(distributed)
    use_distributed = use_distributed and dist_utils.is_distributed()
    d = features.shape[1]
    labels = labels.to(device=features.device, dtype=torch.int64)
    valid = (labels >= 0) & (labels < k)
    with torch.no_grad():
        # Sums, counts and the number of bad labels travel in one buffer; float64 keeps the
        # cross-rank sums independent of how the samples are split. Bad labels are counted
        # rather than raised at once so that every rank raises together instead of one hanging.
        packed = torch.zeros(k * d + k + 1, dtype=torch.float64, device=features.device)
        sums = packed[: k * d].view(k, d)
        sums.index_add_(0, labels[valid], features[valid].double())
        packed[k * d : k * d + k] = torch.bincount(labels[valid], minlength=k).double()
        packed[-1] = float((~valid).sum())
        if use_distributed:
            dist_utils.all_reduce_sum(packed)
        invalid = int(packed[-1])
        if invalid:
            raise ProtoclipError(
                f"{invalid} cluster labels lie outside 0..{k - 1}; the labels do not belong to a clustering "
                f"with k={k}."
            )
        counts = packed[k * d : k * d + k]
        return (sums / counts.clamp_min(1.0).unsqueeze(1)).float()

"""Single-pass prototypes (``proto.single_pass = true``): no extraction pass between episodes.

The faithful episode reads its samples twice: an extraction pass (eval mode, one training view of
each sample) to cluster them, then the training pass. In single-pass mode the training pass of episode ``e``
*records* the projected image and text features it computes anyway (detached, train mode, training
augmentation), and the prototypes of episode ``e + 1`` are clustered from them (k-means per
modality, the teacher's features of the same samples, PBT means) as soon as the pass ends. Episode
``e + 1`` then labels each sample online: its image (text, teacher) label is the nearest image
(text, teacher) centroid to the features the training step has just computed (the teacher's from
the data loader), with no gradient. Targets, PBT and losses are those of the faithful mode.

So the prototypes of an episode come from the previous episode's samples under a model one
episode older, and samples are assigned rather than clustered: the price of saving the second read
of every sample. The first prototype episode runs one extraction pass of the model the warm-up
left (``proto.single_pass_start = "extract"``): the warm-up pass's recording would hold features of
a model that started that pass at random weights. ``"recorded"`` clusters that recording instead.
Without a recording (e.g. a run resumed from a faithful one) an episode falls back to an extraction
pass too. docs/training.md discusses the choice and docs/results.md measures its effect.
"""

from __future__ import annotations

import torch

from protoclip_cli.core import distributed as dist_utils
from protoclip_cli.training.prototypes import EpisodePrototypes


class FeatureRecorder:
    """The keys and projected features of the batches of one training pass on this rank."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.image: list[torch.Tensor] = []
        self.text: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(len(k) for k in self.keys)

    def clear(self) -> None:
        self.keys, self.image, self.text = [], [], []

    def add(self, keys: torch.Tensor, image_proj: torch.Tensor, text_proj: torch.Tensor) -> None:
        self.keys.append(keys.detach().cpu())
        self.image.append(image_proj.detach().float())
        self.text.append(text_proj.detach().float())

    def tensors(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(keys (n,) CPU int64, {"image", "text"}: (n, d) on the training device)."""
        return torch.cat(self.keys), {"image": torch.cat(self.image), "text": torch.cat(self.text)}

    def gathered_state(self) -> dict[str, torch.Tensor] | None:
        """Every rank's recording (rank-major, equal sizes: ranks run the same steps), for a checkpoint.

        A collective: every rank calls it. None when nothing is recorded.
        """
        if not self.keys:
            return None
        keys, features = self.tensors()
        device = features["image"].device
        return {
            "keys": dist_utils.all_gather_cat(keys.to(device)).cpu(),
            "image": dist_utils.all_gather_cat(features["image"]).cpu(),
            "text": dist_utils.all_gather_cat(features["text"]).cpu(),
        }

    def restore(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Take this rank's part of a checkpoint's recording back."""
        ranks = dist_utils.world_size()
        share = state["keys"].shape[0] // ranks
        part = slice(dist_utils.rank() * share, (dist_utils.rank() + 1) * share)
        self.keys = [state["keys"][part].clone()]
        self.image = [state["image"][part].to(device)]
        self.text = [state["text"][part].to(device)]


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared L2, as k-means assigns) of every row of ``features``."""
    features, centroids = features.detach().float(), centroids.float()
    partial = torch.addmm(centroids.pow(2).sum(dim=1).unsqueeze(0), features, centroids.t(), alpha=-2.0)
    return partial.argmin(dim=1)


class OnlineLabels:
    """Labels of a batch as the nearest centroids of the episode's prototypes (single-pass mode)."""

    def __init__(self, prototypes: EpisodePrototypes, device: torch.device):
        def on_device(name: str) -> torch.Tensor:
            return torch.from_numpy(prototypes.centroids[name]).float().to(device)

        self.image = on_device("image")
        self.text = on_device("text")
        self.teacher = on_device("teacher") if prototypes.has_teacher else None

    def __call__(self, outputs: dict, teacher_features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            labels = {
                "img": nearest_centroid(outputs["image_proj"], self.image),
                "txt": nearest_centroid(outputs["text_proj"], self.text),
            }
            if self.teacher is not None:
                if teacher_features is None:
                    raise ValueError("Online teacher labels need the batch's teacher features ('teacher').")
                labels["ext"] = nearest_centroid(teacher_features.to(self.teacher.device), self.teacher)
        return labels

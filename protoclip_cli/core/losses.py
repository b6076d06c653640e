"""ProtoCLIP's losses. Each is a module returning a dict of named scalar tensors.

Every loss is computed over the *global* batch: features are gathered from all ranks with
:func:`~protoclip_cli.core.distributed.gather_with_grad` (only the local part keeps its autograd
history) and labels with ``all_gather_cat``, so every rank returns the same values, and the gradient
on a rank's own features is exactly the gradient of the global-batch loss. DDP's gradient averaging
then scales every term by the same ``1 / world_size``, which keeps the terms' relative weights as in
the reference implementation. Ranks must therefore pass batches of equal size.

The image-text term is InfoNCE (:class:`ClipLoss`, the reference) or, as a recipe choice
(``loss.contrastive = "sigmoid"``), SigLIP's pairwise sigmoid loss (:class:`SigLipLoss`); the
prototype and external-teacher terms are the same with either.

The prototype and external-teacher terms are means over samples of per-sample cross-entropies
against fixed prototypes. Under gradient accumulation they can therefore be computed for one
micro-batch's rows only (``rows``): that micro-batch's share of the whole batch's mean, the other
rows' shares coming from their own micro-batches, which saves recomputing the whole batch's
(batch x k) scores once per micro-batch (:class:`protoclip_cli.training.step.Stepper`).

Losses run in float32 with autocast off: logits reach ``100 * cos`` and soft targets use
``/ 0.01``, too coarse for bf16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from protoclip_cli.core.distributed import all_gather_cat, gather_with_grad, world_size
from protoclip_cli.errors import ProtoclipError

CONTRASTIVE_LOSSES = ("infonce", "sigmoid")


@dataclass
class Prototypes:
    """One episode's prototypes; all centroid matrices are (k, d) in the space named.

    ``img_centroids`` (C_img) and ``txt_centroids`` (C_txt) live in their own modality's space;
    ``img_in_txt`` (P_img->txt) are image clusters back-translated into text space and
    ``txt_in_img`` (P_txt->img) text clusters in image space. The external teacher's clusters exist
    only through their back-translations ``ext_in_img`` / ``ext_in_txt`` (its own centroids, in the
    teacher's space, are kept for inspection).
    """

    img_centroids: torch.Tensor
    txt_centroids: torch.Tensor
    img_in_txt: torch.Tensor
    txt_in_img: torch.Tensor
    ext_centroids: torch.Tensor | None = None
    ext_in_img: torch.Tensor | None = None
    ext_in_txt: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Prototypes":
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (value.to(device) if value is not None else None)
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }
        return replace(self, **moved)


def _fp32_region(tensor: torch.Tensor):
    if torch.is_autocast_enabled(tensor.device.type):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def _global(features: torch.Tensor) -> torch.Tensor:
    return gather_with_grad(features.float())


def _accuracy(scores: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
    return (scores.detach().argmax(dim=1) == labels).float().sum() / rows


def _gradient_times(value: torch.Tensor, factor: float) -> torch.Tensor:
    """``value`` itself, whose gradient is multiplied by ``factor``."""
    return value if factor == 1 else value.detach() + (value - value.detach()) * factor


def _rows_of_batch(
    image_proj: torch.Tensor, text_proj: torch.Tensor, labels: list[torch.Tensor], scale: torch.Tensor,
    rows: slice | None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor, int]:
    """(image rows, text rows, their labels, the scale, rows of the global batch) of a prototype term.

    All rows (``rows`` None): the global batch, gathered from every rank. A slice: only those local
    rows, for their share of the global batch's mean. Each sample's term then reaches the scale
    only in its own micro-batch, so the scale's gradient is multiplied by (global rows / these rows),
    as if every micro-batch had computed the whole batch: the accumulating stepper divides the
    scalars' gradients by the number of micro-batches, and DDP averages the ranks' gradients.
    """
    if rows is None:
        images, texts = _global(image_proj), _global(text_proj)
        return images, texts, [all_gather_cat(label.long()) for label in labels], scale.float(), images.shape[0]
    total = image_proj.shape[0] * world_size()
    images, texts = image_proj[rows].float(), text_proj[rows].float()
    return images, texts, [label[rows].long() for label in labels], _gradient_times(scale.float(), total / images.shape[0]), total


def prototype_targets(centroids: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft targets ``softmax(C[labels] @ C^T / temperature)``; ``temperature <= 0`` gives the labels."""
    if temperature <= 0:
        return labels
    return torch.softmax(centroids[labels] @ centroids.T / temperature, dim=1)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the gathered batch: ``(CE(s I T^T, y) + CE(s T I^T, y)) / 2``.

    The global logits are N x N (N = world size x local batch); a rank's own rows have the labels
    ``rank * n + arange(n)``.
    """

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with _fp32_region(image_features):
            images = _global(image_features)
            texts = _global(text_features)
            logits = logit_scale.float() * images @ texts.T
            labels = torch.arange(logits.shape[0], device=logits.device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"clip": loss}


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss over the gathered batch: every image-text pair is a binary decision.

    ``sigmoid = -1/N * sum_ij log(sigmoid(z_ij * (s * i_i . t_j + b)))`` over the N x N pairs of the
    global batch, with ``z_ij = 1`` for the N matching pairs and -1 for all others, ``s`` the logit
    scale and ``b`` the learnable logit bias (Zhai et al. 2023, initialised to ``s = 10``, ``b = -10``).

    OpenCLIP's distributed ``SigLipLoss`` passes text features from rank to rank and sums each
    rank's rows; the mean of its per-rank losses is this loss of the gathered batch, and under
    ``optim.ddp_gradients = "global-batch"`` the weights receive the same gradient as there
    (tests/test_losses.py checks both on two gloo ranks).
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        with _fp32_region(image_features):
            images = _global(image_features)
            texts = _global(text_features)
            logits = logit_scale.float() * images @ texts.T + logit_bias.float()
            signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
            loss = -F.logsigmoid(signs * logits).sum() / logits.shape[0]
        return {"clip": loss}


class ProtoLoss(nn.Module):
    """Prototype-level discrimination: each modality classifies its samples into the other's clusters.

    ``L_i2t = CE(s * i @ T_img^T, target_txt)`` with ``T_img = P_txt->img`` under PBT, else ``C_txt``;
    ``target_txt`` is ``softmax(C_txt[lbl_txt] @ C_txt^T / tau)`` for ``tau > 0``, else one-hot
    ``lbl_txt``. ``L_t2i`` is symmetric and ``proto = (L_i2t + L_t2i) / 2``. The accuracies count
    samples whose highest student score is their teacher label.
    """

    def __init__(self, target_temperature: float = 0.01, pbt: bool = True) -> None:
        super().__init__()
        self.target_temperature = float(target_temperature)
        self.pbt = bool(pbt)

    def forward(
        self,
        image_proj: torch.Tensor,
        text_proj: torch.Tensor,
        logit_scale_proto: torch.Tensor,
        img_labels: torch.Tensor,
        txt_labels: torch.Tensor,
        protos: Prototypes,
        rows: slice | None = None,
    ) -> dict[str, torch.Tensor]:
        with _fp32_region(image_proj):
            images, texts, (img_labels, txt_labels), scale, total = _rows_of_batch(
                image_proj, text_proj, [img_labels, txt_labels], logit_scale_proto, rows
            )
            img_centroids, txt_centroids = protos.img_centroids.float(), protos.txt_centroids.float()
            image_students = protos.txt_in_img.float() if self.pbt else txt_centroids
            text_students = protos.img_in_txt.float() if self.pbt else img_centroids
            image_scores = scale * images @ image_students.T
            text_scores = scale * texts @ text_students.T
            with torch.no_grad():
                txt_targets = prototype_targets(txt_centroids, txt_labels, self.target_temperature)
                img_targets = prototype_targets(img_centroids, img_labels, self.target_temperature)
            img2txt = F.cross_entropy(image_scores, txt_targets, reduction="sum") / total
            txt2img = F.cross_entropy(text_scores, img_targets, reduction="sum") / total
        return {
            "proto": (img2txt + txt2img) / 2,
            "proto_img2txt": img2txt,
            "proto_txt2img": txt2img,
            "acc_img2txt": _accuracy(image_scores, txt_labels, total),
            "acc_txt2img": _accuracy(text_scores, img_labels, total),
        }


class ExternalTeacherLoss(nn.Module):
    """``ext = (CE(s * i @ P_ext->img^T, lbl_ext) + CE(s * t @ P_ext->txt^T, lbl_ext)) / 2``, one-hot."""

    def forward(
        self,
        image_proj: torch.Tensor,
        text_proj: torch.Tensor,
        logit_scale_proto: torch.Tensor,
        ext_labels: torch.Tensor,
        protos: Prototypes,
        rows: slice | None = None,
    ) -> dict[str, torch.Tensor]:
        if protos.ext_in_img is None or protos.ext_in_txt is None:
            raise ValueError("ExternalTeacherLoss needs Prototypes.ext_in_img and ext_in_txt.")
        with _fp32_region(image_proj):
            images, texts, (labels,), scale, total = _rows_of_batch(image_proj, text_proj, [ext_labels], logit_scale_proto, rows)
            image_scores = scale * images @ protos.ext_in_img.float().T
            text_scores = scale * texts @ protos.ext_in_txt.float().T
            img2ext = F.cross_entropy(image_scores, labels, reduction="sum") / total
            txt2ext = F.cross_entropy(text_scores, labels, reduction="sum") / total
        return {
            "ext": (img2ext + txt2ext) / 2,
            "ext_img": img2ext,
            "ext_txt": txt2ext,
            "acc_img2ext": _accuracy(image_scores, labels, total),
            "acc_txt2ext": _accuracy(text_scores, labels, total),
        }


class ProtoCLIPLoss(nn.Module):
    """``total = w_clip * clip + w_proto * proto + w_ext * ext`` plus per-step diagnostics.

    ``clip`` is the image-text term: InfoNCE (``contrastive="infonce"``) or the sigmoid loss
    (``"sigmoid"``, which needs ``outputs["logit_bias"]``). ``clip``, ``proto`` and ``ext`` are always present (0 for a term not in use); the sub-terms and
    accuracies of a term appear when it is used. Diagnostics (no gradient): ``modality_gap``
    (``||mean(img) - mean(txt)||`` of this rank's normalised tower features), ``feature_std_image`` /
    ``feature_std_text`` (per-dimension std, averaged), ``temperature`` and ``temperature_proto``
    (``1 / scale``), and ``logit_bias`` with the sigmoid loss.
    """

    def __init__(
        self,
        w_clip: float = 1.0,
        w_proto: float = 1.0,
        w_ext: float = 1.0,
        target_temperature: float = 0.01,
        pbt: bool = True,
        contrastive: str = "infonce",
    ) -> None:
        super().__init__()
        if contrastive not in CONTRASTIVE_LOSSES:
            raise ValueError(f"contrastive must be one of {', '.join(CONTRASTIVE_LOSSES)}, got {contrastive!r}.")
        self.w_clip, self.w_proto, self.w_ext = float(w_clip), float(w_proto), float(w_ext)
        self.pbt = bool(pbt)
        self.contrastive = contrastive
        self.clip_loss = ClipLoss() if contrastive == "infonce" else SigLipLoss()
        self.proto_loss = ProtoLoss(target_temperature, pbt)
        self.ext_loss = ExternalTeacherLoss()

    def forward(
        self,
        outputs: dict[str, torch.Tensor | None],
        labels: dict[str, torch.Tensor] | None = None,
        protos: Prototypes | None = None,
        use_proto: bool = False,
        use_ext: bool = False,
        rows: slice | None = None,
    ) -> dict[str, torch.Tensor]:
        """The terms of ``outputs``' batch; with ``rows``, the prototype and teacher terms (and their
        accuracies) are only those rows' share of the global batch's (gradient accumulation)."""
        if (use_proto or use_ext) and (protos is None or labels is None or outputs.get("image_proj") is None):
            raise ValueError("Prototype losses need projection heads, the batch's labels and the prototypes.")
        if use_ext and not self.pbt:
            raise ProtoclipError(
                "The external-teacher loss compares features with back-translated teacher clusters and "
                "needs PBT; set loss.pbt = true or train without a teacher (proto.teacher = '')."
            )
        if self.contrastive == "sigmoid":
            if outputs.get("logit_bias") is None:
                raise ValueError("The sigmoid loss needs outputs['logit_bias']: build the model with contrastive='sigmoid'.")
            terms = self.clip_loss(
                outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs["logit_bias"]
            )
        else:
            terms = self.clip_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"])
        zero = terms["clip"].new_zeros(())
        terms["proto"] = terms["ext"] = zero
        if use_proto:
            terms.update(
                self.proto_loss(
                    outputs["image_proj"], outputs["text_proj"], outputs["logit_scale_proto"],
                    labels["img"], labels["txt"], protos, rows,
                )
            )
        if use_ext:
            if "ext" not in labels:
                raise ValueError("use_ext needs labels['ext'], the batch's teacher-cluster labels.")
            terms.update(
                self.ext_loss(
                    outputs["image_proj"], outputs["text_proj"], outputs["logit_scale_proto"], labels["ext"], protos, rows
                )
            )
        terms["total"] = self.total_of(terms)
        terms.update(self._diagnostics(outputs))
        return terms

    def total_of(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """``w_clip * clip + w_proto * proto + w_ext * ext``."""
        return self.w_clip * terms["clip"] + self.w_proto * terms["proto"] + self.w_ext * terms["ext"]

    @staticmethod
    @torch.no_grad()
    def _diagnostics(outputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        images = outputs["image_features"].detach().float()
        texts = outputs["text_features"].detach().float()
        found = {
            "modality_gap": torch.linalg.vector_norm(images.mean(0) - texts.mean(0)),
            "feature_std_image": images.std(dim=0).mean(),
            "feature_std_text": texts.std(dim=0).mean(),
            "temperature": 1 / outputs["logit_scale"].detach().float(),
        }
        if outputs.get("logit_scale_proto") is not None:
            found["temperature_proto"] = 1 / outputs["logit_scale_proto"].detach().float()
        if outputs.get("logit_bias") is not None:
            found["logit_bias"] = outputs["logit_bias"].detach().float().reshape(())
        return found

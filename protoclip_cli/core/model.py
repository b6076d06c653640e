"""ProtoCLIP's model: open_clip towers, two projection heads and a second temperature.

The CLIP branch (L2-normalised tower outputs, ``logit_scale``) is exactly an open_clip model, so any
open_clip architecture name works and zero-shot evaluation uses it unchanged. The projection heads
feed the prototype losses only. As in the reference implementation, the heads take the *raw*
(un-normalised) tower outputs, and their outputs are L2-normalised.

A model for the sigmoid loss (``contrastive="sigmoid"``) has open_clip's own learnable
``clip.logit_bias`` (as open_clip's SigLIP models), so an export carries it under open_clip's name.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from protoclip_cli.configs.train import ModelConfig
from protoclip_cli.core.pretrained import Pretrained, fetch_pretrained
from protoclip_cli.errors import ProtoclipError

TINY_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_ARCHS = tuple(sorted(p.stem for p in TINY_CONFIG_DIR.glob("*.json")))
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)
# SigLIP's initialisation (Zhai et al. 2023, as open_clip_train's --siglip): logit scale 10, bias -10.
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def register_tiny_configs() -> None:
    """Add this package's tiny open_clip configs (``protoclip-tiny``, ...) to open_clip's registry.

    Idempotent: the folder is added once, so ``open_clip.create_model("protoclip-tiny")`` works after
    the first call (importing this module makes it).
    """
    if not all(name in open_clip.list_models() for name in TINY_ARCHS):
        open_clip.add_model_config(TINY_CONFIG_DIR)


register_tiny_configs()


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int) -> nn.Sequential:
    """``n_layers`` blocks of Linear -> BatchNorm1d -> ReLU, then a Linear to ``out_dim`` (0: one Linear)."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ProtoCLIP(nn.Module):
    """CLIP towers (``.clip``, an open_clip model) plus optional projection heads for prototypes."""

    def __init__(
        self,
        clip: nn.Module,
        embed_dim: int,
        heads: bool = True,
        projection_dim: int = 128,
        projection_hidden_dim: int = 2048,
        projection_n_layers: int = 1,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.embed_dim = embed_dim
        preprocess = open_clip.get_model_preprocess_cfg(clip)
        size = preprocess["size"]
        if isinstance(size, (tuple, list)):
            size = size[0] if size[0] == size[1] else tuple(size)
        self.image_size: int | tuple[int, int] = size
        self.image_mean: tuple[float, ...] = tuple(float(v) for v in preprocess["mean"])
        self.image_std: tuple[float, ...] = tuple(float(v) for v in preprocess["std"])
        self.image_head: nn.Sequential | None = None
        self.text_head: nn.Sequential | None = None
        # Without heads there is no second temperature either: an unused parameter would break DDP.
        self.logit_scale_proto: nn.Parameter | None = None
        if heads:
            self.text_head = projection_head(embed_dim, projection_hidden_dim, projection_dim, projection_n_layers)
            self.image_head = copy.deepcopy(self.text_head)
            self.image_head.load_state_dict(self.text_head.state_dict())
            self.logit_scale_proto = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    @property
    def logit_scale(self) -> nn.Parameter:
        """The CLIP branch's raw temperature parameter (log of the logit scale)."""
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The sigmoid loss's learnable bias (open_clip's ``logit_bias``), None for InfoNCE models."""
        return getattr(self.clip, "logit_bias", None)

    def scalar_parameters(self) -> list[nn.Parameter]:
        """The parameters that scale or shift every logit: both temperatures and the sigmoid bias.

        The losses use them directly, not through a rank's features, so on every rank their gradient
        is already the whole global batch's (the trainer's gradient scaling treats them apart).
        """
        return [p for p in (self.logit_scale, self.logit_scale_proto, self.logit_bias) if p is not None]

    @property
    def has_heads(self) -> bool:
        return self.image_head is not None

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image tower features (the CLIP branch)."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text tower features (the CLIP branch)."""
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Both branches: normalised tower features and projections, both scales (``exp()``-ed) and
        the sigmoid loss's ``logit_bias`` (None for InfoNCE models)."""
        image_raw = self.clip.encode_image(images)
        text_raw = self.clip.encode_text(tokens)
        image_proj = text_proj = logit_scale_proto = None
        if self.has_heads:
            image_proj = F.normalize(self.image_head(image_raw), dim=-1)
            text_proj = F.normalize(self.text_head(text_raw), dim=-1)
            logit_scale_proto = self.logit_scale_proto.exp()
        return {
            "image_features": F.normalize(image_raw, dim=-1),
            "text_features": F.normalize(text_raw, dim=-1),
            "image_proj": image_proj,
            "text_proj": text_proj,
            "logit_scale": self.logit_scale.exp(),
            "logit_scale_proto": logit_scale_proto,
            "logit_bias": self.logit_bias,
        }

    @torch.no_grad()
    def clamp_temperatures(self) -> None:
        """Clamp both raw scales to [0, ln 100] (call after every optimiser step)."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if self.logit_scale_proto is not None:
            self.logit_scale_proto.clamp_(0, MAX_LOGIT_SCALE)

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        """The image tower's parameters (their learning rate drops to 0 for the LiT finish)."""
        return self.clip.visual.parameters()


def _embed_dim(clip: nn.Module, arch: str) -> int:
    config = open_clip.get_model_config(arch)
    if config and "embed_dim" in config:
        return int(config["embed_dim"])
    # Configs from a hub or a local folder: measure the text tower's output instead.
    with torch.no_grad():
        was_training = clip.training
        clip.eval()
        dim = clip.encode_text(torch.zeros(1, clip.context_length, dtype=torch.long)).shape[-1]
        clip.train(was_training)
    return int(dim)


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_notice():
    """open_clip warns on the root logger for every random initialisation, which is our normal case."""
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def build_model(cfg: ModelConfig, contrastive: str = "infonce", weights: bool = True,
                preprocess: dict | None = None) -> ProtoCLIP:
    """Build the towers of ``cfg.arch``, from ``cfg.pretrained`` (any OpenCLIP starting point,
    ``core/pretrained.py``) or at random, with fresh projection heads on top.

    ``weights=False`` skips the starting weights (a reader of a run loads a checkpoint over them
    anyway; it then needs neither the file nor the Hub); ``preprocess`` is the preprocessing config
    the run's towers had (mean, std, resizing), which a hub repository or tag may set apart from the
    architecture's defaults. ``contrastive="sigmoid"`` adds open_clip's ``logit_bias`` and starts from
    SigLIP's scale and bias (a pretrained checkpoint's own scale and bias win, its missing bias is 0,
    as in open_clip). ``cfg.grad_checkpointing`` turns on open_clip's activation checkpointing of both towers.
    """
    register_tiny_configs()
    if ":" not in cfg.arch and cfg.arch not in open_clip.list_models():
        raise ProtoclipError(
            f"Unknown model architecture '{cfg.arch}'; set model.arch to an OpenCLIP name such as RN50 or "
            f"ViT-B-32, or to a tiny config of this package ({', '.join(TINY_ARCHS)})."
        )
    start = fetch_pretrained(cfg) if weights else Pretrained("none", "")
    name, pretrained = start.create_args(cfg.arch)
    siglip = (
        {"init_logit_scale": SIGLIP_INIT_LOGIT_SCALE, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
        if contrastive == "sigmoid" else {}
    )
    try:
        with _quiet_random_init_notice():
            clip = open_clip.create_model(name, pretrained=pretrained, load_weights=weights,
                                          force_preprocess_cfg=preprocess, **siglip)
    except RuntimeError as error:
        if start.kind == "none":
            raise
        raise ProtoclipError(
            f"Could not load {cfg.pretrained} into {cfg.arch} ({error}); use a checkpoint of that architecture."
        ) from error
    if cfg.grad_checkpointing:
        # Recompute each transformer block / ResNet stage in the backward pass instead of keeping
        # its activations (open_clip_train's --grad-checkpointing).
        clip.set_grad_checkpointing(True)
    return ProtoCLIP(
        clip,
        embed_dim=_embed_dim(clip, cfg.arch),
        heads=cfg.heads,
        projection_dim=cfg.projection_dim,
        projection_hidden_dim=cfg.projection_hidden_dim,
        projection_n_layers=cfg.projection_n_layers,
    )


def preprocess_config(model: ProtoCLIP) -> dict:
    """The preprocessing config of the towers (size, mean, std, interpolation, resize mode), as
    plain data for a checkpoint: :func:`build_model` rebuilds the same with ``preprocess``."""
    config = open_clip.get_model_preprocess_cfg(model.clip)
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()}


def get_tokenizer(arch: str) -> Callable[[list[str]], torch.LongTensor]:
    """open_clip's tokenizer for ``arch``, padding or truncating to that architecture's context length."""
    register_tiny_configs()
    return open_clip.get_tokenizer(arch)

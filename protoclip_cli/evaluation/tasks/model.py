"""The model under evaluation: a run (or checkpoint) of this project, or an OpenCLIP checkpoint.

Both expose the CLIP branch only (normalised tower outputs), which is what every task measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from protoclip_cli.core.distributed import resolve_device
from protoclip_cli.core.model import ProtoCLIP, get_tokenizer, register_tiny_configs
from protoclip_cli.core.run_model import load_run_model
from protoclip_cli.data.transforms import normalize
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.data.fingerprint import fingerprint
from protoclip_cli.runs import RunDir


@dataclass
class EvalModel:
    """A CLIP model ready for feature extraction."""

    name: str
    fingerprint: str
    clip: nn.Module  # has encode_image / encode_text (open_clip's or ProtoCLIP's)
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int | tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    run_dir: Path | None = None
    info: dict = field(default_factory=dict)

    def _autocast(self):
        # bf16 on CUDA halves the memory traffic of extraction; features are returned in float32.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _image_tower(self) -> nn.Module:
        # A run's ProtoCLIP normalises in encode_image; its open_clip model gives the raw outputs.
        return self.clip.clip if isinstance(self.clip, ProtoCLIP) else self.clip

    @torch.no_grad()
    def encode_images(self, uint8_batch: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """(B, 3, H, W) uint8 at the model's size -> (B, D) float32 features on the CPU, L2-normalised
        unless ``normalized`` is false (the raw image tower outputs)."""
        images = normalize(uint8_batch, self.mean, self.std, self.device)
        with self._autocast():
            if not normalized:
                return self._image_tower().encode_image(images).float().cpu()
            features = self.clip.encode_image(images)
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (n, D) normalised float32 features on the CPU (one batch; see features.text_features)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            features = self.clip.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu()


def from_run(run: RunDir, checkpoint: Path | None, device: str) -> EvalModel:
    """A run of this project with ``checkpoint`` (None: its newest), as :func:`protoclip_cli.workspace.resolve`
    found it."""
    torch_device = resolve_device(device)
    proto, config, info = load_run_model(run, checkpoint, device=str(torch_device))
    return EvalModel(
        name=f"{run.name}@{Path(info['path']).name}",
        fingerprint=fingerprint([info["path"]]),
        clip=proto,
        tokenizer=get_tokenizer(config.model.arch),
        image_size=proto.image_size,
        mean=proto.image_mean,
        std=proto.image_std,
        device=torch_device,
        run_dir=run.path,
        info={"arch": config.model.arch, **info},
    )


def load_open_clip(arch: str, pretrained: str, device: str) -> EvalModel:
    """An OpenCLIP architecture with a local checkpoint file (this package's tiny configs included)."""
    import open_clip

    register_tiny_configs()
    weights = Path(pretrained)
    if not pretrained or not weights.is_file():
        raise MissingInputError(
            f"--pretrained {pretrained or '(none)'} is not a file; pass the OpenCLIP checkpoint of {arch} to evaluate."
        )
    if arch not in open_clip.list_models():
        raise ProtoclipError(f"Unknown OpenCLIP architecture '{arch}'; `open_clip.list_models()` lists the names.")
    torch_device = resolve_device(device)
    try:
        clip = open_clip.create_model(arch, pretrained=str(weights), device=torch_device)
    except Exception as error:  # torch.load and open_clip raise many types for a file that is not a checkpoint
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if len(reason) > 120:  # torch.load's messages run to paragraphs: their first words say what failed
            reason = reason[:120].rsplit(" ", 1)[0] + " ..."
        raise ProtoclipError(f"Could not load {weights} into {arch} ({reason}); use a checkpoint of that architecture.") from error
    clip.eval()
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    size = preprocess["size"]
    if isinstance(size, (tuple, list)):
        size = size[0] if size[0] == size[1] else tuple(size)
    return EvalModel(
        name=f"{arch}@{weights.name}",
        fingerprint=fingerprint([weights]),
        clip=clip,
        tokenizer=open_clip.get_tokenizer(arch),
        image_size=size,
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        device=torch_device,
        info={"arch": arch, "path": str(weights)},
    )

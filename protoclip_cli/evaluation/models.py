"""The model under evaluation: a run (or checkpoint) of this project, or an OpenCLIP checkpoint.

Both expose the CLIP branch only (normalised tower outputs), which is what every task measures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.workspace import Workspace


def resolve_device(device: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProtoclipError(f"Device {device} was requested but CUDA is not available; use --device cpu.")
    return torch.device(device)


def file_fingerprint(path: Path) -> str:
    """Identity of a weights file for the feature cache: resolved path, size and modification time."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


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
        from protoclip_cli.core.model import ProtoCLIP

        return self.clip.clip if isinstance(self.clip, ProtoCLIP) else self.clip

    @torch.no_grad()
    def encode_images(self, uint8_batch: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """(B, 3, H, W) uint8 at the model's size -> (B, D) float32 features on the CPU, L2-normalised
        unless ``normalized`` is false (the raw image tower outputs)."""
        from protoclip_cli.data.transforms import normalize

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


def _run_dir_of(target: Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint file or None) for a run folder or a checkpoint inside one."""
    if target.is_file():
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        if not (run_dir / "config.toml").is_file():
            raise ProtoclipError(
                f"Checkpoint {target} is not inside a run folder (no config.toml in {run_dir}); "
                "for an OpenCLIP checkpoint use --open-clip ARCH --pretrained FILE."
            )
        return run_dir, target
    return target, None


def load_run(workspace: Workspace, model: str | None, checkpoint: str | None, device: str) -> EvalModel:
    """A run of this project: ``model`` is a run name, a run folder or a checkpoint file
    (default: the workspace's latest run); ``checkpoint`` overrides the run's latest checkpoint."""
    from protoclip_cli.core.model import get_tokenizer
    from protoclip_cli.runs import latest_checkpoint, load_run_model

    if model and Path(model).exists():
        run_dir, checkpoint_file = _run_dir_of(Path(model))
    else:
        run_dir, checkpoint_file = workspace.run_dir(workspace.resolve_run(model or None)), None
    if not (run_dir / "config.toml").is_file():
        raise MissingInputError(
            f"No training run at {run_dir} (config.toml is missing); name a run of {workspace.runs_dir} "
            "or pass --open-clip ARCH --pretrained FILE."
        )
    checkpoint_path = Path(checkpoint) if checkpoint else checkpoint_file or latest_checkpoint(run_dir)
    if checkpoint_path is None:
        raise MissingInputError(
            f"Run {run_dir} has no checkpoint yet; train it first with `protoclip train {run_dir / 'config.toml'}`."
        )
    torch_device = resolve_device(device)
    proto, config, info = load_run_model(run_dir, checkpoint_path, device=str(torch_device))
    return EvalModel(
        name=f"{run_dir.name}@{Path(info['path']).name}",
        fingerprint=file_fingerprint(Path(info["path"])),
        clip=proto,
        tokenizer=get_tokenizer(config.model.arch),
        image_size=proto.image_size,
        mean=proto.image_mean,
        std=proto.image_std,
        device=torch_device,
        run_dir=run_dir,
        info={"arch": config.model.arch, **info},
    )


def load_open_clip(arch: str, pretrained: str, device: str) -> EvalModel:
    """An OpenCLIP architecture with a local checkpoint file (this package's tiny configs included)."""
    import open_clip

    from protoclip_cli.core.model import register_tiny_configs

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
    except RuntimeError as error:
        raise ProtoclipError(f"Could not load {weights} into {arch} ({error}); use a checkpoint of that architecture.") from error
    clip.eval()
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    size = preprocess["size"]
    if isinstance(size, (tuple, list)):
        size = size[0] if size[0] == size[1] else tuple(size)
    return EvalModel(
        name=f"{arch}@{weights.name}",
        fingerprint=file_fingerprint(weights),
        clip=clip,
        tokenizer=open_clip.get_tokenizer(arch),
        image_size=size,
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        device=torch_device,
        info={"arch": arch, "path": str(weights)},
    )

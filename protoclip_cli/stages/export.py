"""`export`: a run's CLIP towers as an OpenCLIP checkpoint.

The file holds the ``state_dict`` of the open_clip model inside :class:`ProtoCLIP` (``.clip``),
with open_clip's own parameter names and nothing else (no projection heads, no optimiser), so
``open_clip.create_model_and_transforms(ARCH, pretrained=FILE)`` loads it. This package's tiny
architectures must be registered first (``protoclip_cli.core.model.register_tiny_configs()``). A run
trained with the sigmoid loss also exports its ``logit_bias``, which open_clip loads into a model
created with a bias (``init_logit_bias=...``, the value is then the file's), as its SigLIP models.
After writing, the export is loaded back through open_clip and its embeddings compared with the
run's on a random batch; the largest difference is recorded in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protoclip_cli.artifacts import atomic_path, file_sha256, write_manifest
from protoclip_cli.config import option, require, to_dict
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.workspace import Workspace

FORMATS = ("open_clip",)
ROUND_TRIP_ATOL = 1e-5


@dataclass(frozen=True)
class ExportConfig:
    run: str = option("", "Run name, run folder or checkpoint file ('' = the workspace's latest run).")
    checkpoint: str = option("", "Checkpoint to export ('' = the run's latest).")
    format: str = option("open_clip", "Export format: open_clip.")
    out: str = option("", "Output file ('' = runs/<run>/export/<run>-<arch>.pt).")

    def __post_init__(self) -> None:
        require(self.format in FORMATS, f"Unknown export format '{self.format}'; choose one of {', '.join(FORMATS)}.")


def run(config: ExportConfig, workspace: Workspace) -> dict[str, Any]:
    """Write the export and its ``manifest.json``; returns the manifest."""
    import torch

    from protoclip_cli.core.model import SIGLIP_INIT_LOGIT_BIAS
    from protoclip_cli.runs import resolve

    resolved = resolve(workspace, config.run, config.checkpoint)
    model, train_config, info = resolved.run.load_model(resolved.checkpoint, device="cpu")
    arch = train_config.model.arch
    out = Path(config.out) if config.out else resolved.run.export_file(arch)
    with atomic_path(out) as tmp:
        torch.save({name: tensor.detach().clone() for name, tensor in model.clip.state_dict().items()}, tmp)
    # open_clip builds a logit_bias only when asked; its value then comes from the file.
    open_clip_kwargs = {"init_logit_bias": SIGLIP_INIT_LOGIT_BIAS} if model.logit_bias is not None else {}
    difference = round_trip_difference(model, arch, out, **open_clip_kwargs)
    if difference > ROUND_TRIP_ATOL:
        out.unlink()
        raise ProtoclipError(
            f"The export of {arch} gives embeddings {difference:.2e} away from the run's through open_clip; "
            "this architecture's open_clip config does not match the run's model."
        )
    return write_manifest(
        out.parent, "export", config=to_dict(config), inputs={"checkpoint": info["path"]},
        file=str(out), format=config.format, arch=arch, sha256=file_sha256(out), episode=info["episode"],
        global_step=info["global_step"], round_trip_max_abs_difference=difference,
        load_with=f"open_clip.create_model_and_transforms({arch!r}, pretrained={str(out)!r}"
        + "".join(f", {name}={value!r}" for name, value in open_clip_kwargs.items()) + ")",
        needs_registration=arch.startswith("protoclip-"),
    )


def round_trip_difference(model, arch: str, path: Path, **open_clip_kwargs) -> float:
    """Largest absolute difference of the normalised embeddings of a random batch (images and
    texts) between the run's model and the export loaded through ``open_clip.create_model_and_transforms``."""
    import open_clip
    import torch

    from protoclip_cli.core.model import get_tokenizer, register_tiny_configs

    register_tiny_configs()
    reloaded, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(path), **open_clip_kwargs)
    reloaded.eval()
    model.eval()
    size = model.image_size if isinstance(model.image_size, tuple) else (model.image_size, model.image_size)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    tokens = get_tokenizer(arch)(["a photo of a red circle", "two blue squares on grass"])
    with torch.no_grad():
        ours = torch.cat([model.encode_image(images), model.encode_text(tokens)])
        theirs = torch.cat([reloaded.encode_image(images, normalize=True), reloaded.encode_text(tokens, normalize=True)])
    return float((ours - theirs).abs().max())

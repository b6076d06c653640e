"""`export`: a run's CLIP towers as an OpenCLIP checkpoint or an OpenCLIP hub folder.

``--format open_clip``: one file holding the ``state_dict`` of the open_clip model inside
:class:`ProtoCLIP` (``.clip``), with open_clip's own parameter names and nothing else (no projection
heads, no optimiser), so ``open_clip.create_model_and_transforms(ARCH, pretrained=FILE)`` loads it
(this package's tiny architectures must be registered first, ``register_tiny_configs()``).

``--format hf``: the folder ``open_clip.push_to_hf_hub`` uploads (``core/hub_folder.py``):
``open_clip_config.json`` (self-contained model and preprocessing config),
``open_clip_model.safetensors`` and a model card (``evaluation/reports/model_card.py``: recipe, data set,
evaluation results). ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it without
any registration; ``--push USER/NAME`` uploads it with huggingface_hub.

A run trained with the sigmoid loss also exports its ``logit_bias``: the ``.pt`` loads into a model
created with a bias (``init_logit_bias=...``; the value is then the file's), as open_clip's SigLIP
models, and the hub folder's config carries ``init_logit_bias`` so ``local-dir:`` builds it.

Either way the export is loaded back through open_clip and its embeddings compared with the run's
on a random batch before it is kept; the largest difference is recorded in the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from protoclip_cli.artifacts import atomic_dir, atomic_path, file_sha256, write_manifest
from protoclip_cli.config import to_dict
from protoclip_cli.configs.export import ExportConfig
from protoclip_cli.core.hub_folder import is_hub_folder, load_hub_folder, push_folder, write_hub_folder
from protoclip_cli.core.model import SIGLIP_INIT_LOGIT_BIAS, get_tokenizer, register_tiny_configs
from protoclip_cli.core.run_model import load_run_model
from protoclip_cli.data.sources import run_datasets
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.reports.model_card import render_model_card
from protoclip_cli.evaluation.reports.results import checkpoint_results, read_results
from protoclip_cli.workspace import Workspace, resolve
from protoclip_cli.training.episodes import episode_phase

ROUND_TRIP_ATOL = 1e-5


def run(config: ExportConfig, workspace: Workspace) -> dict[str, Any]:
    """Write the export and its manifest ``<export name>.manifest.json`` next to it (so exports into one
    folder keep their own records); returns the manifest."""
    resolved = resolve(workspace, config.run, config.checkpoint)
    model, train_config, info = load_run_model(resolved.run, resolved.checkpoint, device="cpu")
    if config.format == "hf":
        return _export_hub_folder(config, resolved, model, train_config, info)
    import torch

    arch = train_config.model.arch
    out = Path(config.out) if config.out else resolved.run.export_file(arch)
    # open_clip builds a logit_bias only when asked; its value then comes from the file.
    open_clip_kwargs = {"init_logit_bias": SIGLIP_INIT_LOGIT_BIAS} if model.logit_bias is not None else {}
    with atomic_path(out) as tmp:
        torch.save({name: tensor.detach().clone() for name, tensor in model.clip.state_dict().items()}, tmp)
        difference = round_trip_difference(model, arch, lambda: load_open_clip_file(arch, tmp, **open_clip_kwargs))
    return write_manifest(
        out.parent, "export", config=to_dict(config), inputs={"checkpoint": info["path"]}, file_name=manifest_name(out),
        file=str(out), format=config.format, arch=arch, sha256=file_sha256(out), episode=info["episode"],
        global_step=info["global_step"], round_trip_max_abs_difference=difference,
        load_with=f"open_clip.create_model_and_transforms({arch!r}, pretrained={str(out)!r}"
        + "".join(f", {name}={value!r}" for name, value in open_clip_kwargs.items()) + ")",
        needs_registration=arch.startswith("protoclip-"),
    )


def manifest_name(out: Path) -> str:
    """The file name of an export's manifest, next to the export ``out``."""
    return f"{out.name}.manifest.json"


def _export_hub_folder(config: ExportConfig, resolved, model, train_config, info: dict) -> dict[str, Any]:
    arch = train_config.model.arch
    out = Path(config.out) if config.out else resolved.run.hub_export_dir(arch)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_hub_folder(out))):
        raise ProtoclipError(f"--out {out} exists and is not an OpenCLIP hub folder; pass a new folder.")
    load_as = f"hf-hub:{config.push}" if config.push else f"local-dir:{out}"
    results = read_results(resolved.run.eval_dir)
    readme = render_model_card(
        config.push.split("/")[-1] if config.push else resolved.run.name, train_config, info,
        _dataset_record(resolved.workspace, train_config), results, config.license, load_as,
        phases=_episode_phases(train_config),
    )
    with atomic_dir(out) as tmp:  # a folder that failed the round trip is never left behind
        write_hub_folder(model.clip, arch, tmp, readme)
        difference = round_trip_difference(model, arch, lambda: load_hub_folder(tmp)[0])

    def record(pushed_to: str | None) -> dict[str, Any]:
        return write_manifest(
            out.parent, "export", config=to_dict(config), inputs={"checkpoint": info["path"]}, file_name=manifest_name(out),
            file=str(out), format=config.format, arch=arch, files=sorted(p.name for p in out.iterdir()),
            weights_sha256=file_sha256(out / "open_clip_model.safetensors"), episode=info["episode"],
            global_step=info["global_step"], round_trip_max_abs_difference=difference,
            results_in_card=sorted(checkpoint_results(results, info["path"])[0]),
            load_with=f"open_clip.create_model_and_transforms({f'local-dir:{out}'!r})", needs_registration=False,
            pushed_to=pushed_to,
        )

    manifest = record(None)  # the folder is complete whether or not the upload succeeds
    return record(push_folder(out, config.push, config.private)) if config.push else manifest


def _episode_phases(train_config) -> list[str]:
    """The phase of every episode of the run's recipe ('warmup', 'proto', 'lit', 'clip'), for the card."""
    # Whether the teacher is used changes no phase's name.
    return [episode_phase(train_config, e, use_teacher=False).name for e in range(train_config.schedule.episodes)]


def _dataset_record(workspace: Workspace, train_config) -> dict | None:
    """The data set's download record, when the run has one data set and the workspace still has it."""
    names = run_datasets(train_config.data).names
    if len(names) != 1:
        return None
    name = names[0]

    try:
        return workspace.dataset_manifest(name)
    except MissingInputError:
        return None


def load_open_clip_file(arch: str, path: Path, **open_clip_kwargs):
    """The open_clip model of an ``--format open_clip`` file, as a user loads it."""
    import open_clip

    register_tiny_configs()
    return open_clip.create_model_and_transforms(arch, pretrained=str(path), **open_clip_kwargs)[0]


def round_trip_difference(model, arch: str, load: Callable) -> float:
    """Largest absolute difference of the normalised embeddings of a random batch (images and texts)
    between the run's model and the export as ``load()`` gives it back through open_clip; a
    :class:`ProtoclipError` when it exceeds ``ROUND_TRIP_ATOL``."""
    import torch

    reloaded = load()
    reloaded.eval()
    model.eval()
    size = model.image_size if isinstance(model.image_size, tuple) else (model.image_size, model.image_size)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    tokens = get_tokenizer(arch)(["a photo of a red circle", "two blue squares on grass"])
    with torch.no_grad():
        ours = torch.cat([model.encode_image(images), model.encode_text(tokens)])
        theirs = torch.cat([reloaded.encode_image(images, normalize=True), reloaded.encode_text(tokens, normalize=True)])
    difference = float((ours - theirs).abs().max())
    if difference > ROUND_TRIP_ATOL:
        raise ProtoclipError(
            f"The export of {arch} gives embeddings {difference:.2e} away from the run's through open_clip; "
            "this architecture's open_clip config does not match the run's model."
        )
    return difference

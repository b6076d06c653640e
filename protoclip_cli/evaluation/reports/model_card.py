"""The model card (``README.md``) of an exported hub folder.

open_clip's own card (``open_clip.push_to_hf_hub.generate_readme``: YAML metadata with the tags,
``library_name: open_clip``, the pipeline, license and data set, then the model details, usage and
citation) followed by what only this project knows: the evaluation results of the exported
checkpoint (``runs/<run>/eval/*.json``, see :mod:`protoclip_cli.evaluation.reports.results`), the data set
it was trained on and the whole resolved recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from protoclip_cli import __version__
from protoclip_cli import config as config_io
from protoclip_cli.data.sources import run_datasets
from protoclip_cli.evaluation.reports.results import checkpoint_results

if TYPE_CHECKING:
    from protoclip_cli.configs.train import TrainConfig

CITATION = """@article{chen2022prototypical,
  title={Prototypical Contrastive Language Image Pretraining},
  author={Chen, Delong and Wu, Zhao and Liu, Fan and Yang, Zaiquan and Huang, Yixiang and Bao, Yiping and Zhou, Erjin},
  journal={arXiv preprint arXiv:2206.10996},
  year={2022}
}"""


def _split_count(dataset: dict | None, split: str) -> tuple[int | None, int | None]:
    """(pairs downloaded, failed) of the training split, from the data set's download record."""
    entry = (dataset or {}).get("splits", {}).get(split, dataset or {})
    return entry.get("count_ok"), entry.get("count_failed", 0)


# How the card names the phases of training/episodes.py's episode_phase.
PHASE_NAMES = {"warmup": "InfoNCE warm-up", "proto": "prototype", "lit": "LiT", "clip": "CLIP"}


def _episode_counts(phases: Sequence[str]) -> str:
    """``1 InfoNCE warm-up, 10 prototype, 1 LiT``: the episodes of each phase, in order of appearance."""
    return ", ".join(f"{phases.count(phase)} {PHASE_NAMES.get(phase, phase)}" for phase in dict.fromkeys(phases))


def _method(config: "TrainConfig", phases: Sequence[str] | None = None) -> str:
    """What trained the checkpoint; ``phases`` are the phases of the episodes it has reached, so a
    ProtoCLIP recipe none of whose episodes used prototypes is not called ProtoCLIP."""
    if not config.proto.enabled:
        return "CLIP (InfoNCE) baseline trained by the ProtoCLIP trainer"
    if phases is not None and "proto" not in phases:
        return (
            f"CLIP (InfoNCE) only: a ProtoCLIP recipe, but none of the {len(phases)} episode(s) up to this checkpoint "
            f"trained with prototypes ({_episode_counts(phases)})"
        )
    parts = [f"ProtoCLIP: episodic prototypes (k = {config.proto.k})"
             + (f" in {phases.count('proto')} of {len(phases)} episodes" if phases is not None else "")]
    parts.append("Prototypical Back Translation" if config.loss.pbt else "no PBT")
    if config.proto.teacher and config.loss.pbt:
        parts.append(f"external teacher {config.proto.teacher}")
    return ", ".join(parts)


def card_fields(config: "TrainConfig", info: dict[str, Any], dataset: dict | None, license: str, load_as: str,
                phases: Sequence[str] | None = None) -> dict:
    """open_clip's ``model_card`` dict for ``generate_readme``; ``phases``: the phase of every episode of
    the recipe (``training/episodes.py``), of which the card describes those the checkpoint reached."""
    names = ", ".join(f"`{name}`" for name in run_datasets(config.data).names)
    pairs = _split_count(dataset, config.data.split)[0]
    source = f" ({dataset.get('source')}, {pairs} image-text pairs)" if dataset else ""
    reached = list(phases[: int(info["episode"]) + 1]) if phases is not None else None
    method = _method(config, reached)
    return {
        "tags": ("clip", "protoclip"),
        "license": license,
        "description": (
            f"A {config.model.arch} CLIP model trained with {method} on "
            f"{names}{source}, exported with protoclip {__version__}."
        ),
        "details": {
            "Model Type": "Contrastive image-text, zero-shot image classification.",
            "Architecture": config.model.arch,
            "Method": method,
            "Dataset": names.replace("`", ""),
            "Training": (
                f"{info['global_step']} of {info['total_steps']} steps, {config.schedule.episodes} episodes"
                + (f" ({_episode_counts(phases)})" if phases is not None else "") + ", "
                f"batch {config.data.batch_size} per process, lr {config.optim.lr}"
            ),
            "Checkpoint": f"{Path(info['path']).name} (episode {info['episode']})",
        },
        "usage": (
            "```python\nimport open_clip\n\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms({load_as!r})\n"
            f"tokenizer = open_clip.get_tokenizer({load_as!r})\n```\n"
        ),
        "citation": CITATION,
    }


def results_table(results: dict[str, dict]) -> str:
    """A Markdown table of every numeric metric of ``results`` (percentages as recorded)."""
    rows = ["| result | data | metric | value |", "|---|---|---|---|"]
    for name, record in sorted(results.items()):
        for metric, value in record.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append(f"| {name} | {record.get('dataset', '')} | {metric} | {value:.4f} |")
    return "\n".join(rows) + "\n"


def render_model_card(
    name: str,
    config: "TrainConfig",
    info: dict[str, Any],
    dataset: dict | None,
    results: dict[str, dict],
    license: str,
    load_as: str,
    phases: Sequence[str] | None = None,
) -> str:
    """The README.md of the hub folder of ``config``'s run at the checkpoint ``info`` describes;
    ``phases``: see :func:`card_fields`."""
    from open_clip.push_to_hf_hub import generate_readme

    text = generate_readme(card_fields(config, info, dataset, license, load_as, phases), name)
    kept, others = checkpoint_results(results, info["path"])
    text += "\n## Evaluation results\n"
    if kept:
        text += (
            "Computed by `protoclip evaluate` with this checkpoint (accuracies and recalls in %; "
            "definitions in the protoclip documentation, docs/evaluation.md).\n\n" + results_table(kept)
        )
    else:
        text += "No evaluation of this checkpoint was recorded (`protoclip evaluate RUN --task all` records them).\n"
    if others:
        text += f"\n({others} result(s) of other checkpoints of the run are left out.)\n"
    text += "\n## Training data\n"
    if dataset:
        pairs, failed = _split_count(dataset, config.data.split)
        text += (
            f"`{config.data.dataset}`, split `{config.data.split}`: source `{dataset.get('source')}`, {pairs} "
            f"image-text pairs downloaded ({failed} failed).\n"
        )
    else:
        text += f"`{config.data.dataset}`, split `{config.data.split}` (its download record was not found).\n"
    text += "\n## Training recipe\nThe resolved protoclip recipe (`protoclip train RECIPE` reproduces the run):\n\n"
    text += "```toml\n" + config_io.dumps(config).rstrip() + "\n```\n"
    return text

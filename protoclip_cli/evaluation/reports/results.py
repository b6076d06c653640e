"""Evaluation results on disk: one JSON record per result, and the same metrics in CLIP_benchmark's schema.

The evaluation folder is ``runs/<run>/eval/`` (``<workspace>/eval/<model>/`` for an OpenCLIP
checkpoint)::

    <name>.json          one result: task, name, dataset, model, metrics (%), details
    <name>*.png          its plots (reports/result_plots.py)
    manifest.json        every result of the folder with its metrics (stages/evaluate.py)
    clip_benchmark/<dataset>_<pretrained>_<model>_en_<task>.json   CLIP_benchmark records
    cache/               cached features (tasks/features.py)

A CLIP_benchmark record is what ``clip_benchmark eval`` writes for one model on one data set:
``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, metrics as fractions in
[0, 1] under CLIP_benchmark's names (``acc1``, ``acc5``, ``mean_per_class_recall``,
``image_retrieval_recall@k``, ``text_retrieval_recall@k``, ``lp_acc1``, ...), file names from its
default ``--output`` template. ``clip_benchmark build FOLDER...`` reads every ``*.json`` of the
folders it is given into one CSV, so these records live in a folder of their own (the evaluation
folder also holds ``manifest.json``, which is no result).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protoclip_cli.artifacts import MANIFEST, write_json

CLIP_BENCHMARK_DIR = "clip_benchmark"
LANGUAGE = "en"

# CLIP_benchmark's name for the data sets that are the same images and split as one of its own.
# COCO is not among them: CLIP_benchmark's mscoco_captions is the Karpathy 5K test split of
# val2014, this project's (and the reference's) COCO is val2017.
BENCHMARK_DATASETS = {
    "imagenet-val": "imagenet1k",
    "cifar10-test": "cifar10",
    "cifar100-test": "cifar100",
    "stl10-test": "stl10",
    "flickr30k-test": "flickr30k",
    "stanford_cars-test": "cars",
    "flowers102-test": "flowers",
    "gtsrb-test": "gtsrb",
    "country211-test": "country211",
}
BENCHMARK_TASKS = {
    "zeroshot": "zeroshot_classification",
    "linear-probe": "linear_probe",
    "retrieval": "zeroshot_retrieval",
    "clustering": "clustering",
    "modality-gap": "modality_gap",
}
_PERCENT = {  # our metric (in %) -> CLIP_benchmark's (a fraction), per task
    "zeroshot": {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"},
    "linear-probe": {"top1": "lp_acc1", "top5": "lp_acc5", "mean_per_class_recall": "lp_mean_per_class_recall"},
    "clustering": {"purity": "purity"},
}


def benchmark_dataset(name: str) -> str:
    """CLIP_benchmark's name of a data set (``imagenet-val`` -> ``imagenet1k``), else our name."""
    return BENCHMARK_DATASETS.get(name, name)


def benchmark_metrics(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """Our metrics of ``task`` under CLIP_benchmark's names, percentages turned into fractions."""
    if task == "retrieval":
        converted = {}
        for name, value in metrics.items():
            direction, _, k = name.partition("_R@")
            # CLIP_benchmark's "image retrieval" finds the image of a caption: our text -> image.
            key = {"text_to_image": "image_retrieval_recall@", "image_to_text": "text_retrieval_recall@"}.get(direction)
            converted[f"{key}{k}" if key and k else name] = round(value / 100.0, 8)
        return converted
    renamed = _PERCENT.get(task, {})
    return {renamed.get(k, k): (round(v / 100.0, 8) if k in renamed else v) for k, v in metrics.items()}


def _pretrained(model: dict[str, Any]) -> str:
    # A run's checkpoint is named by the run (``run@step-*.pt``); an OpenCLIP checkpoint by its file,
    # as ``clip_benchmark eval --pretrained FILE`` names it.
    return model["name"] if "episode" in model else str(model.get("path") or model["name"])


def benchmark_records(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The CLIP_benchmark records of one result (a suite gives one per member data set)."""
    members = record.get("members") or [record]
    model = record["model"]
    return [
        {
            "dataset": benchmark_dataset(member["data"]),
            "model": model.get("arch", model["name"]),
            "pretrained": _pretrained(model),
            "task": BENCHMARK_TASKS.get(member["task"], member["task"].replace("-", "_")),
            "metrics": benchmark_metrics(member["task"], member["metrics"]),
            "language": LANGUAGE,
        }
        for member in members
    ]


def benchmark_file_name(entry: dict[str, Any]) -> str:
    """CLIP_benchmark's default ``{dataset}_{pretrained}_{model}_{language}_{task}.json``."""
    pretrained = entry["pretrained"]
    if Path(pretrained).is_file():
        pretrained = Path(pretrained).name  # as clip_benchmark eval does for a checkpoint file
    parts = [entry["dataset"], pretrained, entry["model"], entry["language"], entry["task"]]
    return "_".join(p.replace("/", "_") for p in parts) + ".json"


def write_result(path: Path, record: dict[str, Any]) -> list[Path]:
    """Write ``record`` to ``path`` and its CLIP_benchmark records to ``<folder>/clip_benchmark/``;
    returns the CLIP_benchmark files."""
    write_json(path, record)
    folder = Path(path).parent / CLIP_BENCHMARK_DIR
    return [write_json(folder / benchmark_file_name(entry), entry) for entry in benchmark_records(record)]


def read_results(eval_dir: Path) -> dict[str, dict[str, Any]]:
    """Every result record of an evaluation folder, by name (none when the folder does not exist)."""
    found = {}
    for path in sorted(Path(eval_dir).glob("*.json")):
        if path.name == MANIFEST:
            continue
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # not a result of this project
        if isinstance(record, dict) and "task" in record and "metrics" in record:
            found[record.get("name", path.stem)] = record
    return found


def _same_file(a: str | None, b: str | None) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def checkpoint_results(results: dict[str, dict], checkpoint: str | Path) -> tuple[dict[str, dict], int]:
    """(the results of :func:`read_results` computed with ``checkpoint``, how many others were left out)."""
    kept = {name: r for name, r in results.items() if _same_file(r.get("model", {}).get("path"), str(checkpoint))}
    return kept, len(results) - len(kept)

"""The reference's zero-shot suite: zero-shot top-1/top-5 on each of its data sets found under one
folder (:mod:`protoclip_cli.evaluation.data.suite_layouts`), their mean top-1, and COCO retrieval."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from protoclip_cli.console import warn
from protoclip_cli.errors import MissingInputError
from protoclip_cli.evaluation.data.suite_layouts import RETRIEVAL, SUITE, find
from protoclip_cli.evaluation.tasks import retrieval, zeroshot
from protoclip_cli.evaluation.tasks.model import EvalModel


def evaluate(
    model: EvalModel, root: str | Path, names: Sequence[str], cache_dir: Path | None, batch_size: int, workers: int
) -> dict:
    """Zero-shot top-1/top-5 on every suite data set found under ``root`` (or exactly ``names``),
    their mean top-1, and COCO retrieval: ``{"metrics", "members", "missing"}``."""
    members, missing = [], []
    for name in names or SUITE:
        data = find(root, name)
        if data is None:
            if names:
                raise MissingInputError(f"Suite data set {name} is not under {root} in any layout this suite reads; "
                                        "see docs/evaluation.md for the layouts.")
            missing.append(name)
            continue
        if name == RETRIEVAL:
            task, result = "retrieval", retrieval.evaluate(model, data, cache_dir, batch_size, workers)
        else:
            task, result = "zeroshot", zeroshot.evaluate(model, data, None, cache_dir, batch_size, workers)
        members.append({"suite": name, "task": task, "data": data.name, **data.details, **result})
    if not members:
        raise MissingInputError(
            f"No data set of the zero-shot suite is under {root}; expected folders such as {root}/cifar10/ (torchvision's "
            f"files), {root}/birdsnap/test/<class>/ or {root}/wds_cars/ (see docs/evaluation.md)."
        )
    if missing:
        warn(f"Not under {root}: {', '.join(missing)}; the mean covers the {len(members)} data set(s) found.")
    classification = [m for m in members if m["task"] == "zeroshot"]
    metrics = {f"{m['suite']}_top1": m["metrics"]["top1"] for m in classification}
    if classification:
        metrics["mean_top1"] = round(float(np.mean([m["metrics"]["top1"] for m in classification])), 4)
    for member in members:
        if member["task"] == "retrieval":
            metrics["coco_mean_recall"] = member["metrics"]["mean_recall"]
    return {"metrics": metrics, "members": members, "missing": missing,
            "classification_datasets": len(classification)}  # fmt: skip

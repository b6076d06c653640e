"""How good are a run's prototypes? Per episode: the AMI of the image, text and teacher clusterings
against the embedded data set's ground-truth classes (and its colour and shape alone), cluster
counts, and the training pass's mean prototype accuracies and temperatures from metrics.jsonl.

Reads only what training wrote (``episodes/<n>/prototypes.h5``, ``metrics.jsonl``) and the data
set's sample metadata; no model is run. Used by docs/results.md to explain the comparison.

    python benchmarks/prototype_quality.py --workspace WS compare-protoclip-s0 compare-protoclip-s1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ACCURACIES = ("acc_img2txt", "acc_txt2img", "acc_img2ext", "acc_txt2ext")
DIAGNOSTICS = ("temperature", "temperature_proto", "modality_gap", "proto", "ext", "clip")


def ground_truth(workspace, dataset: str) -> dict[int, dict]:
    from protoclip_cli.data.shards import iter_samples

    return {s.key: s.meta for s in iter_samples(workspace.shards(dataset), images=False)}


def episode_rows(run, truth: dict[int, dict]) -> list[dict]:
    from sklearn.metrics import adjusted_mutual_info_score as ami

    from protoclip_cli.evaluation.reports.prototype_report import read_episode

    steps: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in run.metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "step":
            for name in ACCURACIES + DIAGNOSTICS:
                if isinstance(record.get(name), (int, float)):
                    steps[record["episode"]][name].append(float(record[name]))
    rows = []
    for episode, path in run.episodes().items():
        clusters = read_episode(path)
        meta = [truth[int(k)] for k in clusters.keys]
        row: dict = {"episode": episode, "samples": len(clusters.keys)}
        for modality, labels in clusters.labels.items():
            row[f"{modality}_k_used"] = int(len(np.unique(labels)))
            for attribute in ("label", "colour", "shape"):
                row[f"{modality}_ami_{attribute}"] = round(float(ami([m[attribute] for m in meta], labels)), 4)
        row.update({name: round(float(np.mean(v)), 4) for name, v in steps.get(episode, {}).items()})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run names (or folders) of the workspace")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--json", default="", help="write every row here")
    args = parser.parse_args(argv)

    from protoclip_cli.workspace import resolve
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(args.workspace)
    truths: dict[str, dict] = {}
    result = {}
    for name in args.runs:
        run = resolve(workspace, name).run
        dataset = run.config().data.dataset
        truth = truths.setdefault(dataset, ground_truth(workspace, dataset))
        result[run.name] = episode_rows(run, truth)
    columns = ("episode", "image_ami_label", "text_ami_label", "teacher_ami_label", "image_k_used",
               "acc_img2txt", "acc_txt2img", "acc_img2ext", "temperature_proto")
    for name, rows in result.items():
        print(name)
        print("  " + " ".join(f"{c:>17}" for c in columns))
        for row in rows:
            print("  " + " ".join(f"{row.get(c, float('nan')):>17}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

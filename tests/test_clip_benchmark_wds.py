"""CLIP_benchmark's own numbers: `protoclip evaluate --export-wds DIR` writes the zero-shot split in the
webdataset layout CLIP_benchmark reads, and `clip_benchmark eval --model_type open_clip --model
local-dir:EXPORT --dataset wds/NAME` on it gives the zero-shot top-1 `protoclip evaluate` gives, within
0.5 points (evaluation/data/benchmark_wds.py).

The fast test reads a tiny export back with CLIP_benchmark's own loader; the integration test runs
the real `clip_benchmark` command on the embedded held-out split of the shared evaluation run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import RUN
from protoclip_cli.configs.evaluate import EvaluateConfig
from protoclip_cli.configs.export import ExportConfig
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data.benchmark_wds import benchmark_template, write_benchmark_wds
from protoclip_cli.evaluation.data.readers import embedded
from protoclip_cli.stages import evaluate, export


def test_templates_take_clip_benchmarks_form():
    assert benchmark_template("a photo of a {}.") == "a photo of a {c}."
    assert benchmark_template(lambda c: f"itap of a {c}.") == "itap of a {c}."
    assert benchmark_template("{} in {braces}").format(c="cat") == "cat in {braces}"
    with pytest.raises(ProtoclipError, match="no place for the class name"):
        benchmark_template("a photo.")


# CLIP_benchmark's loader leaves webdataset's shardshuffle unset, and webdataset warns about it.
@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_clip_benchmarks_loader_reads_the_export(tiny_workspace, tmp_path):
    from clip_benchmark.datasets.builder import build_wds_dataset

    data = embedded(tiny_workspace, "synthetic", "heldout")
    written = write_benchmark_wds(data, data.templates, tmp_path / "wds", max_count=50)
    assert written == {"folder": str(tmp_path / "wds"), "images": 128, "shards": 3}
    loaded = build_wds_dataset("synthetic-heldout", transform=lambda image: image.size, data_dir=str(tmp_path / "wds"))
    assert loaded.classes == data.classnames
    assert loaded.templates == [t.replace("{}", "{c}") for t in data.templates]
    samples = list(loaded)
    assert [label for _, label in samples] == data.labels.tolist()  # row order, the labels of the split
    assert {size for size, _ in samples} == {(64, 64)}
    # A rerun replaces its own export; any other folder is left alone.
    assert write_benchmark_wds(data, data.templates, tmp_path / "wds")["shards"] == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ProtoclipError, match="is no CLIP_benchmark webdataset"):
        write_benchmark_wds(data, data.templates, tmp_path / "mine")


# `clip_benchmark eval` as its console script runs it. CLIP_benchmark 1.6.2's zero-shot `accuracy` calls
# float() on a one-element array, which NumPy 2.4 refuses (LAION-AI/CLIP_benchmark#147): where it does,
# that one conversion is made with .item(), the same arithmetic; everything else is CLIP_benchmark's own.
CLIP_BENCHMARK = """
import sys

import torch
from clip_benchmark.metrics import zeroshot_classification

try:
    zeroshot_classification.accuracy(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), topk=(1,))
except TypeError:
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy().item()) / len(target)
                for k in topk]

    zeroshot_classification.accuracy = accuracy
from clip_benchmark.cli import main

sys.exit(main())
"""


@pytest.mark.integration
def test_clip_benchmark_eval_gives_protoclip_evaluates_top1(trained_run, synthetic_workspace, tmp_path):
    hub = tmp_path / "hub"
    export.run(ExportConfig(run=RUN, format="hf", out=str(hub)), synthetic_workspace)
    wds = tmp_path / "wds"
    manifest = evaluate.run(EvaluateConfig(task="zeroshot", model=RUN, export_wds=str(wds), workers=0, plots=False,
                                           cache=False, out=str(tmp_path / "zeroshot.json")), synthetic_workspace)
    result = next(iter(manifest["written"].values()))
    assert result["clip_benchmark_wds"]["images"] == result["images"] == 256
    command = result["clip_benchmark_wds"]["command"]
    assert command.endswith(f"--dataset wds/synthetic-heldout --dataset_root {wds} --task zeroshot_classification --no_amp")

    out = tmp_path / "clip_benchmark.json"
    ran = subprocess.run(
        [sys.executable, "-c", CLIP_BENCHMARK, "eval", "--model_type", "open_clip", "--model", f"local-dir:{hub}",
         "--dataset", "wds/synthetic-heldout", "--dataset_root", str(wds), "--task", "zeroshot_classification",
         "--no_amp", "--num_workers", "0", "--batch_size", "64", "--output", str(out)],
        # CLIP_benchmark takes CUDA when it sees one; evaluate ran on the CPU here.
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    theirs = json.loads(out.read_text())
    assert theirs["dataset"] == "wds/synthetic-heldout" and theirs["task"] == "zeroshot_classification"
    print(f"zero-shot top-1 on {result['images']} images: CLIP_benchmark {100 * theirs['metrics']['acc1']:.2f}, "
          f"protoclip evaluate {result['metrics']['top1']:.2f} (chance {result['chance_top1']:.2f})")
    assert abs(100 * theirs["metrics"]["acc1"] - result["metrics"]["top1"]) <= 0.5
    assert abs(100 * theirs["metrics"]["acc5"] - result["metrics"]["top5"]) <= 0.5
    assert result["metrics"]["top1"] > 2 * result["chance_top1"]  # a trained model: the agreement is not at chance

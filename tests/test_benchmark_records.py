"""CLIP_benchmark records: our metrics under CLIP_benchmark's names equal what CLIP_benchmark's own
metric code computes on the same scores, and `clip_benchmark build` collects the records that
`evaluate` writes into its CSV."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

from protoclip_cli.evaluation.reports.results import benchmark_metrics

torch.set_num_threads(2)


def clip_benchmark_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """`clip_benchmark.metrics.zeroshot_classification.accuracy`, whose last line fails under NumPy 2
    (float() of a 1-element array): the same top-k agreement, summed with torch."""
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def test_zeroshot_metrics_match_clip_benchmark_on_random_scores():
    from sklearn.metrics import balanced_accuracy_score

    from protoclip_cli.evaluation.tasks.zeroshot import (
        mean_per_class_recall,
        topk_accuracy,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 11, generator=gen, dtype=torch.float64)  # continuous: no ties
    labels = torch.randint(0, 11, (300,), generator=gen)
    labels[labels == 3] = 4  # a class that never occurs is left out of the mean, as in scikit-learn
    ours = {k: 100 * v for k, v in topk_accuracy(logits, labels, ks=(1, 5)).items()}
    ours["mean_per_class_recall"] = 100 * mean_per_class_recall(logits, labels)
    theirs_acc1, theirs_acc5 = clip_benchmark_accuracy(logits, labels, topk=(1, 5))
    converted = benchmark_metrics("zeroshot", ours)
    assert set(converted) == {"acc1", "acc5", "mean_per_class_recall"}
    assert converted["acc1"] == pytest.approx(theirs_acc1, abs=1e-7)
    assert converted["acc5"] == pytest.approx(theirs_acc5, abs=1e-7)
    balanced = balanced_accuracy_score(labels.numpy(), logits.argmax(dim=1).numpy())
    assert converted["mean_per_class_recall"] == pytest.approx(balanced, abs=1e-7)


@pytest.mark.parametrize("captions_per_image", [1, 3])
def test_retrieval_metrics_match_clip_benchmark_directions(captions_per_image):
    """CLIP_benchmark's image_retrieval_recall is text -> image, text_retrieval_recall image -> text."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    from protoclip_cli.evaluation.tasks.retrieval import retrieval_recall

    gen = torch.Generator().manual_seed(captions_per_image)
    images = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    owners = torch.arange(40).repeat_interleave(captions_per_image)
    texts = torch.nn.functional.normalize(images[owners] + 0.9 * torch.randn(len(owners), 16, generator=gen), dim=-1)
    ours = {k: 100 * v for k, v in retrieval_recall(images, texts, owners, ks=(1, 5, 10)).items()}
    converted = benchmark_metrics("retrieval", ours)

    scores = texts @ images.T  # CLIP_benchmark's (texts, images) score matrix
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owners)), owners] = True
    for k in (1, 5, 10):
        image_retrieval = (batchify(recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        text_retrieval = (batchify(recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert converted[f"image_retrieval_recall@{k}"] == pytest.approx(image_retrieval, abs=1e-6)
        assert converted[f"text_retrieval_recall@{k}"] == pytest.approx(text_retrieval, abs=1e-6)
    assert 0 < converted["image_retrieval_recall@1"] < converted["image_retrieval_recall@10"] < 1


def test_clip_benchmark_build_collects_every_task(trained_run, synthetic_workspace, tmp_path, monkeypatch):
    from clip_benchmark import cli as clip_benchmark_cli

    from protoclip_cli.configs.evaluate import EvaluateConfig
    from protoclip_cli.stages.evaluate import run

    manifest = run(EvaluateConfig(task="all", model="eval-fixture", workers=0, device="cpu"), synthetic_workspace)
    folder = trained_run / "eval" / "clip_benchmark"
    written = {name: record for name, record in manifest["written"].items()}
    files = sorted(p for record in written.values() for p in record["clip_benchmark"])
    assert len(files) == 5 and all(str(folder) == str(p).rsplit("/", 1)[0] for p in files)
    checkpoint = json.loads((trained_run / "eval" / "zeroshot.json").read_text())["model"]["name"]
    assert checkpoint.startswith("eval-fixture@step-")
    assert (folder / f"synthetic-heldout_{checkpoint}_protoclip-tiny_en_zeroshot_classification.json").is_file()

    out = tmp_path / "benchmark.csv"
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "build", str(folder), "--output", str(out)])
    clip_benchmark_cli.main()  # the `clip_benchmark build` console script
    with out.open() as f:
        rows = {row["task"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"zeroshot_classification", "linear_probe", "zeroshot_retrieval", "clustering", "modality_gap"}
    for row in rows.values():
        assert row["model"] == "protoclip-tiny" and row["pretrained"] == checkpoint and row["language"] == "en"
        assert row["model_fullname"] == f"protoclip-tiny {checkpoint}" and row["dataset"] == "synthetic-heldout"
    zeroshot = written["zeroshot"]["metrics"]
    assert float(rows["zeroshot_classification"]["acc1"]) == pytest.approx(zeroshot["top1"] / 100, abs=1e-8)
    assert float(rows["zeroshot_classification"]["acc5"]) == pytest.approx(zeroshot["top5"] / 100, abs=1e-8)
    assert float(rows["zeroshot_classification"]["mean_per_class_recall"]) == pytest.approx(
        zeroshot["mean_per_class_recall"] / 100, abs=1e-8)
    probe = written["linear-probe"]["metrics"]
    assert float(rows["linear_probe"]["lp_acc1"]) == pytest.approx(probe["top1"] / 100, abs=1e-8)
    assert float(rows["linear_probe"]["lp_mean_per_class_recall"]) == pytest.approx(
        probe["mean_per_class_recall"] / 100, abs=1e-8)
    retrieval = written["retrieval"]["metrics"]
    for k in (1, 5, 10):
        assert float(rows["zeroshot_retrieval"][f"image_retrieval_recall@{k}"]) == pytest.approx(
            retrieval[f"text_to_image_R@{k}"] / 100, abs=1e-8)
        assert float(rows["zeroshot_retrieval"][f"text_retrieval_recall@{k}"]) == pytest.approx(
            retrieval[f"image_to_text_R@{k}"] / 100, abs=1e-8)
    assert float(rows["clustering"]["ami"]) == written["clustering"]["metrics"]["ami"]
    assert float(rows["modality_gap"]["gap"]) == written["modality-gap"]["metrics"]["gap"]
    # The records are valid fractions where CLIP_benchmark expects them.
    assert all(0 <= float(rows["zeroshot_retrieval"][f"image_retrieval_recall@{k}"]) <= 1 for k in (1, 5, 10))
    assert np.isfinite(float(rows["linear_probe"]["lp_acc5"]))

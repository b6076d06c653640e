"""`evaluate` on a model trained on the embedded default data set (one small run shared by the
evaluate, cluster and export tests through :func:`trained_run`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import RUN

torch.set_num_threads(2)


def _cli(*args: str):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    return CliRunner().invoke(app, list(args))


def test_trained_run_beats_chance_on_heldout_zeroshot(trained_run, synthetic_workspace):
    from protoclip_cli.configs.evaluate import EvaluateConfig
    from protoclip_cli.stages.evaluate import run

    manifest = run(EvaluateConfig(task="synthetic-zeroshot", model=RUN, workers=0, device="cpu"), synthetic_workspace)
    path = trained_run / "eval" / "synthetic-zeroshot.json"
    assert manifest["written"]["synthetic-zeroshot"]["path"] == str(path)
    result = json.loads(path.read_text())
    ground_truth = synthetic_workspace.dataset_manifest("synthetic")["ground_truth"]
    assert result["images"] == 256 and result["classes"] == len(ground_truth["classes"])
    assert result["templates"] == len(ground_truth["templates"])
    # Clearly above chance: under guessing (p = 1/36) this many hits out of 256 has probability < 1e-3.
    from scipy.stats import binom

    hits = round(result["metrics"]["top1"] / 100 * result["images"])
    assert binom.sf(hits - 1, result["images"], 1 / result["classes"]) < 1e-3, result

    # The reported numbers follow from the cached features by the documented formula (float64).
    cache = trained_run / "eval" / "cache"
    images = torch.load(next(cache.glob("synthetic-heldout-image.*.pt")), weights_only=True)["features"].double()
    prompts = torch.load(next(cache.glob("synthetic-heldout-prompts-text.*.pt")), weights_only=True)["features"].double()
    classes = prompts.view(len(ground_truth["classes"]), len(ground_truth["templates"]), -1)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    classes = classes.mean(dim=1)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    scores = (images @ classes.T).numpy()
    from protoclip_cli.evaluation.data.readers import embedded

    labels = embedded(synthetic_workspace, "synthetic", "heldout").labels
    own = scores[np.arange(len(labels)), labels]
    rank = (scores >= own[:, None]).sum(axis=1) - 1
    assert result["metrics"]["top1"] == pytest.approx(100 * np.mean(rank < 1), abs=1e-3)
    assert result["metrics"]["top5"] == pytest.approx(100 * np.mean(rank < 5), abs=1e-3)
    # The top-k curve (drawn in synthetic-zeroshot.png) by the same formula, k = 1 .. 10.
    assert result["topk_curve"] == pytest.approx({str(k): 100 * np.mean(rank < k) for k in range(1, 11)}, abs=1e-3)
    assert result["plots"] == [str(trained_run / "eval" / f"synthetic-zeroshot{suffix}.png")
                               for suffix in ("", "-tsne", "-samples")]


def test_all_tasks_on_the_embedded_default_share_cached_features(trained_run, synthetic_workspace):
    # Other test files train runs in the session's workspace too: make the shared run its latest.
    os.utime(trained_run / "config.toml")
    cache = trained_run / "eval" / "cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")} if cache.is_dir() else {}
    result = _cli("evaluate", "--task", "all", "--workers", "0", "--device", "cpu",
                  "--workspace", str(synthetic_workspace.root))
    assert result.exit_code == 0, result.output
    assert "Using run" in result.output  # no MODEL: the latest run, named on the console
    eval_dir = trained_run / "eval"
    for name in ("zeroshot", "linear-probe", "retrieval", "clustering", "modality-gap"):
        assert name in result.stdout
        assert json.loads((eval_dir / f"{name}.json").read_text())["task"] == name
    probe = json.loads((eval_dir / "linear-probe.json").read_text())
    assert (probe["train_images"], probe["test_images"]) == (512, 256)
    assert probe["metrics"]["top1"] > 3 * probe["chance_top1"]
    retrieval = json.loads((eval_dir / "retrieval.json").read_text())
    assert retrieval["captions"] == 256 and len(retrieval["metrics"]) == 7
    assert retrieval["metrics"]["text_to_image_R@10"] > 100 * 10 / 256  # above chance
    clustering = json.loads((eval_dir / "clustering.json").read_text())
    assert clustering["k"] == 36 and -1 <= clustering["metrics"]["ami"] <= 1
    gap = json.loads((eval_dir / "modality-gap.json").read_text())["metrics"]
    assert 0 <= gap["gap"] <= 2 and -1 <= gap["pair_cosine"] <= 1
    # Features computed by the first test are reused, not recomputed.
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert before and all(after[name] == mtime for name, mtime in before.items())
    assert len([n for n in after if n.startswith("synthetic-heldout-image.")]) == 1
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert {"synthetic-zeroshot", "zeroshot", "retrieval"} <= set(manifest["results"])
    # Plots next to each JSON, listed in the record and printed; modality-gap has none.
    expected = {"zeroshot": ["", "-tsne", "-samples"], "linear-probe": [""], "retrieval": [""], "clustering": ["-tsne"],
                "modality-gap": []}
    printed = " ".join(result.output.split())
    from PIL import Image

    for name, suffixes in expected.items():
        plots = [str(eval_dir / f"{name}{suffix}.png") for suffix in suffixes]
        assert json.loads((eval_dir / f"{name}.json").read_text())["plots"] == plots
        for plot in plots:
            assert f"plot {plot}" in printed
            with Image.open(plot) as png:
                assert png.format == "PNG" and min(png.size) > 100


def test_a_run_folder_brings_its_workspace(trained_run, tmp_path, monkeypatch):
    """`protoclip evaluate WS/runs/NAME` from another directory finds WS's data sets without --workspace."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROTOCLIP_WORKSPACE", raising=False)
    result_file = trained_run / "eval" / "zeroshot.json"
    result_file.unlink(missing_ok=True)
    result = _cli("evaluate", str(trained_run), "--task", "zeroshot", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "belongs to the workspace" in " ".join(result.output.split())
    record = json.loads(result_file.read_text())
    assert record["images"] == 256 and record["model"]["path"].startswith(str(trained_run / "checkpoints"))
    assert not (tmp_path / "protoclip-workspace").exists()

"""The stages after the download on a tiny data set written straight to shards: train, evaluate,
cluster, export and compare's scoring in seconds, so the fast lane covers every stage. The same
stages on the real download are the integration tests (test_train.py, test_evaluate.py, ...)."""

from __future__ import annotations

import json

import numpy as np
import torch

from helpers import cli
from protoclip_cli.configs.cluster import ClusterConfig
from protoclip_cli.configs.evaluate import EvaluateConfig
from protoclip_cli.configs.export import ExportConfig
from protoclip_cli.core.checkpoint import load_checkpoint
from protoclip_cli.core.run_model import load_run_model
from protoclip_cli.runs import RunDir
from protoclip_cli.stages import cluster, evaluate, export


def test_the_tiny_run_writes_its_artifacts_and_its_prototypes(tiny_run):
    config, run_dir = tiny_run
    run = RunDir(run_dir)
    manifest = json.loads(run.manifest_file.read_text())
    assert manifest["status"] == "complete" and manifest["steps_per_episode"] == [4, 4]
    assert [p.name for p in run.checkpoints()] == ["step-00000004.pt", "step-00000008.pt"]
    state = load_checkpoint(run.latest_checkpoint())
    assert (state.global_step, state.episode, state.complete) == (8, 1, True)
    assert list(run.episodes()) == [1]  # the warm-up episode clusters nothing
    lines = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert [l["phase"] for l in lines if l["kind"] == "episode"] == ["warmup", "proto"]
    assert all(np.isfinite(l["total"]) for l in lines if l["kind"] == "step")


def test_a_run_loads_with_the_weights_of_its_checkpoint(tiny_run):
    config, run_dir = tiny_run
    model, loaded, info = load_run_model(run_dir)
    assert loaded == config and info["global_step"] == 8 and info["complete"]
    saved = load_checkpoint(RunDir(run_dir).latest_checkpoint()).model
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_evaluate_scores_the_tiny_run_on_its_held_out_split(tiny_run, tiny_workspace, tmp_path):
    manifest = evaluate.run(EvaluateConfig(task="all", model="tiny", workers=0, plots=False, cache=False,
                                           out=str(tmp_path)), tiny_workspace)
    results = {record["task"]: record for record in manifest["written"].values()}
    assert set(results) == {"zeroshot", "linear-probe", "retrieval", "clustering", "modality-gap"}
    zeroshot = results["zeroshot"]
    assert zeroshot["images"] == 128 and zeroshot["classes"] == 36 and zeroshot["chance_top1"] == round(100 / 36, 4)
    assert 0 <= zeroshot["metrics"]["top1"] <= zeroshot["metrics"]["top5"] <= 100
    assert json.loads((tmp_path / "zeroshot.json").read_text())["metrics"] == zeroshot["metrics"]


def test_cluster_reports_the_prototype_episode(tiny_run, tiny_workspace, tmp_path):
    report = cluster.run(ClusterConfig(run="tiny", tsne_points=0, out=str(tmp_path / "report")), tiny_workspace)
    assert report["episode"] == 1 and set(report["modalities"]) == {"image", "text"}
    assert (tmp_path / "report" / "report.json").is_file()


def test_export_writes_an_open_clip_file_that_gives_the_runs_embeddings(tiny_run, tiny_workspace, tmp_path):
    out = tmp_path / "tiny.pt"
    manifest = export.run(ExportConfig(run="tiny", format="open_clip", out=str(out)), tiny_workspace)
    assert out.is_file() and manifest["round_trip_max_abs_difference"] <= 1e-5


def test_recipes_are_listed_and_shown_by_name(tmp_path):
    listed = cli("recipes")
    assert listed.exit_code == 0 and "synthetic-clip" in listed.output and "cc3m" in listed.output
    shown = cli("recipes", "show", "synthetic")
    assert shown.exit_code == 0 and 'name = "synthetic-protoclip"' in shown.output
    copied = cli("recipes", "copy", "cc3m", str(tmp_path))
    assert copied.exit_code == 0 and (tmp_path / "cc3m.toml").read_text() == cli("recipes", "show", "cc3m").output
    again = cli("recipes", "copy", "cc3m", str(tmp_path))
    assert again.exit_code == 1 and "exists; pass --force" in " ".join(again.output.split())

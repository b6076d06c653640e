"""The training options of OpenCLIP's trainer, end to end on the embedded data set with the prototype
and external-teacher losses on: the sigmoid loss (its bias trained, logged, saved, exported),
gradient checkpointing and gradient accumulation (two micro-batches of 32 per step)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import small_config

# A warm-up episode and a prototype episode with the teacher; no LiT finish.
OPTIONS = ["schedule.episodes=2", "schedule.lit_start_episode=99", "loss.contrastive='sigmoid'",
           "model.grad_checkpointing=true", "optim.accum_freq=2"]


@pytest.fixture(scope="module")
def options_run(synthetic_teacher, synthetic_workspace):
    from protoclip_cli.stages.train import run

    torch.set_num_threads(2)
    config = small_config("name='options'", *OPTIONS, teacher=Path(synthetic_teacher).stem)
    manifest = run(config, synthetic_workspace)
    return config, synthetic_workspace.run_dir(config.name), manifest


def test_sigmoid_run_trains_its_bias_with_the_prototype_terms(options_run):
    from protoclip_cli.core.run_model import load_run_model

    config, run_dir, manifest = options_run
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in l]
    steps = [l for l in steps if l["kind"] == "step"]
    # Two episodes of 256 samples in steps of 2 micro-batches of 32.
    assert len(steps) == manifest["total_steps"] == 2 * 256 // (2 * 32)
    assert [l["step"] for l in steps] == list(range(1, 9))
    proto = [l for l in steps if l["phase"] == "proto"]
    assert proto and all(l["total"] == pytest.approx(l["clip"] + l["proto"] + l["ext"], rel=1e-5) for l in proto)
    # SigLIP's loss at the start: -log sigmoid(10 cos - 10) ~ 10 per positive pair plus ~0 per negative.
    assert 5 < steps[0]["clip"] < 15 and all(math.isfinite(l["clip"]) for l in steps)
    assert steps[0]["logit_bias"] != -10.0 and steps[-1]["logit_bias"] != steps[0]["logit_bias"]
    model, loaded, _ = load_run_model(run_dir)
    assert loaded.loss.contrastive == "sigmoid" and model.logit_bias.item() == pytest.approx(steps[-1]["logit_bias"])


def test_sigmoid_run_exports_its_bias_to_open_clip(options_run, synthetic_workspace, tmp_path):
    import open_clip

    from protoclip_cli.core.model import register_tiny_configs
    from protoclip_cli.core.run_model import load_run_model
    from protoclip_cli.configs.export import ExportConfig
    from protoclip_cli.stages.export import run

    _, run_dir, _ = options_run
    out = tmp_path / "siglip.pt"
    manifest = run(ExportConfig(run="options", out=str(out)), synthetic_workspace)
    assert "init_logit_bias=-10.0" in manifest["load_with"] and manifest["round_trip_max_abs_difference"] <= 1e-5
    register_tiny_configs()
    clip, _, _ = open_clip.create_model_and_transforms("protoclip-tiny", pretrained=str(out), init_logit_bias=-10.0)
    model, _, _ = load_run_model(run_dir)
    assert clip.logit_bias.item() == model.logit_bias.item() != -10.0
    assert clip.logit_scale.item() == model.logit_scale.item()

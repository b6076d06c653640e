"""Single-pass mode (`proto.single_pass = true`): prototypes clustered from the previous training
pass's recording, samples labelled online with their nearest prototype, no extraction pass."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch

from protoclip_cli.data.shards import shard_keys
from protoclip_cli.training.single_pass import FeatureRecorder, nearest_centroid
from helpers import small_config


def test_nearest_centroid_is_the_brute_force_argmin():
    generator = torch.Generator().manual_seed(0)
    features, centroids = torch.randn(50, 7, generator=generator), torch.randn(9, 7, generator=generator)
    expected = torch.cdist(features.double(), centroids.double()).argmin(dim=1)
    assert torch.equal(nearest_centroid(features, centroids), expected)


def test_recorder_keeps_batches_in_order_and_round_trips_a_checkpoint():
    recorder = FeatureRecorder()
    for start in (0, 4):
        keys = torch.arange(start, start + 4)
        recorder.add(keys, torch.full((4, 3), float(start)), torch.full((4, 3), -float(start)))
    keys, features = recorder.tensors()
    assert keys.tolist() == list(range(8)) and features["image"][4:].eq(4).all() and features["text"][:4].eq(0).all()
    state = recorder.gathered_state()
    restored = FeatureRecorder()
    restored.restore(state, torch.device("cpu"))
    again, restored_features = restored.tensors()
    assert torch.equal(again, keys) and torch.equal(restored_features["image"], features["image"])
    assert FeatureRecorder().gathered_state() is None


@pytest.fixture(scope="module")
def single_pass_run(synthetic_teacher, synthetic_workspace):
    from protoclip_cli.stages.train import run

    torch.set_num_threads(2)
    # warm-up, two prototype episodes, the LiT finish; the first prototype episode clusters the warm-up's
    # recording here (the default extracts instead: test_the_first_prototype_episode_extracts_by_default)
    config = small_config("proto.single_pass=true", "proto.single_pass_start='recorded'", "schedule.episodes=4",
                          "name='single-pass'", teacher=Path(synthetic_teacher).stem)
    run(config, synthetic_workspace)
    return config, synthetic_workspace.run_dir(config.name), synthetic_workspace


def test_prototypes_come_from_the_previous_pass_and_no_episode_extracts(single_pass_run):
    config, run_dir, workspace = single_pass_run
    plan = json.loads((run_dir / "episodes" / "plan.json").read_text())
    shards = workspace.split_dir("synthetic")
    for episode in (1, 2):
        with h5py.File(run_dir / "episodes" / str(episode) / "prototypes.h5") as f:
            assert f.attrs["source_episode"] == episode - 1
            # The recording is the previous episode's trained samples (256: 8 full batches of 32).
            previous = {key for name in plan["episodes"][episode - 1] for key in shard_keys(shards / name)}
            assert set(f["keys"][:].tolist()) == previous and len(f["keys"]) == 256
            assert f["teacher"]["centroids"].shape == (6, 384) and f["image/in_text"].shape == (8, 32)
    assert not (run_dir / "episodes" / "3").exists()  # the LiT finish needs no prototypes
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    episodes = [l for l in lines if l["kind"] == "episode"]
    assert [e["phase"] for e in episodes] == ["warmup", "proto", "proto", "lit"]
    assert all(e["seconds"]["extract"] == 0 for e in episodes)
    # The clustering for episode e + 1 happens at the end of episode e (warm-up and first proto episode).
    assert ["cluster_next" in e["seconds"] for e in episodes] == [True, True, False, False]
    steps = [l for l in lines if l["kind"] == "step" and l["phase"] == "proto"]
    assert steps and all(0 <= l["acc_img2txt"] <= 1 and l["ext"] > 0 for l in steps)


def test_online_labels_are_the_nearest_prototypes_of_the_features_the_step_computed(single_pass_run):
    """Reload the last checkpoint's model: its labels for a batch are the argmin over the centroids."""
    from protoclip_cli.core.run_model import load_run_model
    from protoclip_cli.training.prototypes import load_prototypes
    from protoclip_cli.training.single_pass import OnlineLabels

    config, run_dir, _ = single_pass_run
    model, _, _ = load_run_model(run_dir)
    prototypes = load_prototypes(run_dir / "episodes" / "2" / "prototypes.h5")
    images, tokens = torch.rand(5, 3, 64, 64), torch.randint(1, 100, (5, model.context_length))
    with torch.no_grad():
        outputs = model(images, tokens)
    teacher = torch.nn.functional.normalize(torch.randn(5, 384), dim=1)
    labels = OnlineLabels(prototypes, torch.device("cpu"))(outputs, teacher)
    for name, features, modality in (("img", outputs["image_proj"], "image"), ("txt", outputs["text_proj"], "text"),
                                     ("ext", teacher, "teacher")):
        distances = torch.cdist(features.double(), torch.from_numpy(prototypes.centroids[modality]).double())
        assert torch.equal(labels[name], distances.argmin(dim=1)), name


def test_the_first_prototype_episode_extracts_by_default(synthetic_workspace):
    """The warm-up pass began at random weights: the first prototype episode clusters one extraction
    pass of the model the warm-up left, the next one the first prototype episode's recording."""
    from protoclip_cli.stages.train import run

    config = small_config("proto.single_pass=true", "schedule.episodes=3", "schedule.lit_start_episode=99",
                          "name='single-pass-default'")
    run(config, synthetic_workspace)
    run_dir = synthetic_workspace.run_dir(config.name)
    episodes = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    episodes = [e for e in episodes if e["kind"] == "episode"]
    assert [e["phase"] for e in episodes] == ["warmup", "proto", "proto"]
    assert [e["seconds"]["extract"] > 0 for e in episodes] == [False, True, False]
    assert ["cluster_next" in e["seconds"] for e in episodes] == [False, True, False]
    with h5py.File(run_dir / "episodes" / "1" / "prototypes.h5") as f1, h5py.File(run_dir / "episodes" / "2" / "prototypes.h5") as f2:
        assert "source_episode" not in f1.attrs and f2.attrs["source_episode"] == 1


def test_without_a_warmup_the_first_prototype_episode_extracts_once(synthetic_workspace):
    from protoclip_cli.stages.train import run

    config = small_config("proto.single_pass=true", "schedule.infonce_warmup_episodes=0", "schedule.episodes=2",
                          "schedule.lit_start_episode=99", "name='single-pass-bootstrap'")
    run(config, synthetic_workspace)
    run_dir = synthetic_workspace.run_dir(config.name)
    episodes = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"episode"' in l]
    episodes = [e for e in episodes if e["kind"] == "episode"]
    assert episodes[0]["seconds"]["extract"] > 0 and episodes[1]["seconds"]["extract"] == 0
    with h5py.File(run_dir / "episodes" / "0" / "prototypes.h5") as f0, h5py.File(run_dir / "episodes" / "1" / "prototypes.h5") as f1:
        assert "source_episode" not in f0.attrs and f1.attrs["source_episode"] == 0

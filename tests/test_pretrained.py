"""Any OpenCLIP starting point as ``model.pretrained`` (core/pretrained.py): an exported run's hub
folder (``local-dir:``) and the same folder as a cached Hub repository (``hf-hub:``) start the towers
from exactly its weights, with fresh projection heads; an unknown tag, an uncached hub name and a
tag whose weights are not cached fail before any work in one sentence saying how to fetch them.

There is no network here (conftest sets HF_HUB_OFFLINE=1): a Hub repository is put into a cache of
the test's own in the layout huggingface_hub keeps, which is what a connected machine's download
leaves behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli, small_config
from protoclip_cli.configs.export import ExportConfig
from protoclip_cli.core.model import build_model
from protoclip_cli.core.run_model import load_run_model
from protoclip_cli.runs import RunDir
from protoclip_cli.stages import export, train
from protoclip_cli.training.setup import TrainingDevice, build_training_model

WEIGHTS = "open_clip_model.safetensors"


@pytest.fixture(scope="module")
def exported(tiny_run, tiny_workspace, tmp_path_factory) -> Path:
    """The tiny run as an OpenCLIP hub folder (`protoclip export --format hf`)."""
    out = tmp_path_factory.mktemp("export") / "tiny-hf"
    export.run(ExportConfig(run="tiny", format="hf", out=str(out)), tiny_workspace)
    return out


def _towers_equal_the_export(model, folder: Path) -> None:
    towers, saved = model.clip.state_dict(), load_file(folder / WEIGHTS)
    assert towers.keys() == saved.keys()
    assert all(torch.equal(towers[name], saved[name]) for name in saved)


def test_a_run_from_local_dir_starts_from_exactly_the_exported_weights(exported, tiny_workspace, tmp_path):
    config = small_config("name='from-export'", f"model.pretrained='local-dir:{exported}'", "schedule.episodes=1",
                          "schedule.lit_start_episode=99", "data.episode_size=128")
    model, _, _ = build_training_model(config, TrainingDevice.for_recipe(config), world_size=1)
    _towers_equal_the_export(model, exported)  # before the first step
    assert model.has_heads and not any(name.startswith(("image_head", "text_head")) for name in load_file(exported / WEIGHTS))

    train.run(config, tiny_workspace)
    run = RunDir(tiny_workspace.run_dir("from-export"))
    # Readers rebuild the run from its recipe and checkpoint alone: the starting folder is not needed.
    moved = tmp_path / "moved"
    shutil.move(exported, moved)
    try:
        trained, _, info = load_run_model(run.path)
    finally:
        shutil.move(moved, exported)
    assert info["complete"]
    saved = load_file(exported / WEIGHTS)
    assert any(not torch.equal(trained.clip.state_dict()[name], saved[name]) for name in saved)  # it trained


def _cache_repository(cache: Path, repo: str, folder: Path) -> None:
    """``folder`` as huggingface_hub caches a download of model repository ``repo``."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


def test_a_cached_hub_repository_loads_offline(exported, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _cache_repository(tmp_path / "hub", "me/tiny-protoclip", exported)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = small_config("model.pretrained='hf-hub:me/tiny-protoclip'")
    _towers_equal_the_export(build_model(config.model), exported)


def _refused(workspace, *sets: str) -> str:
    result = cli("train", "synthetic", *[a for s in ("name='refused'", "proto.teacher=''", *sets) for a in ("--set", s)],
                 "--set", "device='cpu'", "--workspace", str(workspace.root))
    assert result.exit_code == 1, result.output
    assert not workspace.run_dir("refused").exists()  # before any work
    sentence = " ".join(result.output.split())
    assert sentence.startswith("error:") and "Traceback" not in sentence
    return sentence


def test_an_unknown_tag_is_one_sentence_listing_the_tags(tiny_workspace):
    sentence = _refused(tiny_workspace, "model.arch='ViT-B-32'", "model.pretrained='laion2b_s99b_b1k'")
    assert "'laion2b_s99b_b1k' is neither a file nor a pretrained tag of ViT-B-32" in sentence
    assert "laion2b_s34b_b79k" in sentence and "openai" in sentence


def test_an_uncached_hub_name_says_how_to_fetch_it(tiny_workspace):
    sentence = _refused(tiny_workspace, "model.pretrained='hf-hub:nobody/not-cached-anywhere'")
    assert "model.pretrained 'hf-hub:nobody/not-cached-anywhere' cannot be loaded" in sentence
    assert "HF_HOME" in sentence and "HF_HUB_OFFLINE=1" in sentence
    assert "open_clip.create_model('hf-hub:nobody/not-cached-anywhere')" in sentence


def test_a_known_tag_that_is_not_cached_says_how_to_fetch_it(tiny_workspace):
    sentence = _refused(tiny_workspace, "model.arch='ViT-B-32'", "model.pretrained='laion2b_s34b_b79k'")
    assert "pretrained tag 'laion2b_s34b_b79k' of ViT-B-32 cannot be loaded" in sentence
    assert "HF_HOME" in sentence and "create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')" in sentence


def test_a_folder_of_another_architecture_is_refused(exported, tiny_workspace):
    sentence = _refused(tiny_workspace, "model.arch='RN50'", f"model.pretrained='local-dir:{exported}'")
    assert "describes another architecture than model.arch = RN50" in sentence

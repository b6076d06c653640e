"""An episode_size under one batch cannot be honoured (episodes are whole shards): train says so."""

from __future__ import annotations

from pathlib import Path

from protoclip_cli.training.episodes import plan_episodes

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synthetic.toml"


def test_note_names_the_asked_and_the_real_episode_size(capsys):
    from helpers import small_config

    from protoclip_cli.stages.train import note_episode_size

    plan = plan_episodes({f"{i:05d}.tar": 128 for i in range(4)}, 2, 10, seed=0)
    note_episode_size(small_config("data.episode_size=10", "data.batch_size=32"), plan, world_size=2)
    message = " ".join(capsys.readouterr().err.split())
    assert ("data.episode_size = 10 is smaller than one global batch (64); episodes are made of whole shards, so "
            "each holds at least 128 samples") in message
    note_episode_size(small_config("data.episode_size=100", "data.batch_size=32"), plan, world_size=1)
    note_episode_size(small_config("data.episode_size=0", "data.batch_size=32"), plan, world_size=1)
    assert capsys.readouterr().err == ""


def test_train_says_it_before_training(synthetic_workspace, tmp_path):
    from typer.testing import CliRunner

    from conftest import linked_workspace
    from protoclip_cli.cli import app

    workspace = linked_workspace(synthetic_workspace, tmp_path / "ws")

    args = ["name=t-episode-size", "data.episode_size=10", "data.batch_size=32", "data.workers=0",
            "schedule.episodes=1", "proto.enabled=false", "model.heads=false", "proto.teacher=''",
            "model.projection_dim=32", "model.projection_hidden_dim=64", "device='cpu'"]  # fmt: skip
    result = CliRunner().invoke(app, ["train", str(RECIPE), *(x for a in args for x in ("--set", a)),
                                      "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    message = " ".join(result.output.split())
    assert "data.episode_size = 10 is smaller than one global batch (32)" in message
    assert "each holds at least 128 samples" in message
    assert "finished at step 4." in message and "Broken samples" not in message

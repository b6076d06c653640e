"""A run whose newest checkpoint holds tensors of other shapes (a file of another model copied in, a
recipe changed by hand): export, evaluate and train say so in one sentence naming the checkpoint
and the first difference, and a refused resume leaves the run's manifest as it was."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import linked_workspace
from protoclip_cli.cli import app
from protoclip_cli.runs import RunDir
from helpers import small_config

NAME = "foreign-checkpoint"
ONE_EPISODE = ["schedule.episodes=1", "proto.enabled=false", "model.heads=false", f"name='{NAME}'"]


@pytest.fixture(scope="module")
def foreign(synthetic_workspace, tmp_path_factory):
    """A finished one-episode run whose newest checkpoint's positional embedding is 39 x 128, not 32 x 128."""
    from protoclip_cli.stages.train import run

    workspace = linked_workspace(synthetic_workspace, tmp_path_factory.mktemp("foreign") / "ws")
    run(small_config(*ONE_EPISODE), workspace)
    run_dir = RunDir(workspace.run_dir(NAME))
    checkpoint = run_dir.latest_checkpoint()
    state = torch.load(checkpoint, weights_only=True)
    assert tuple(state["model"]["clip.positional_embedding"].shape) == (32, 128)
    state["model"]["clip.positional_embedding"] = torch.zeros(39, 128)
    torch.save(state, checkpoint)
    return workspace, run_dir, checkpoint


def _sentence(checkpoint) -> str:
    return (f"error: Checkpoint {checkpoint} does not fit the model of its run's config.toml: "
            "clip.positional_embedding is 39x128 in the checkpoint and 32x128 in the run's model; it was written "
            "for another model, so ")


@pytest.mark.parametrize("command", [
    ["export", NAME, "--format", "open_clip"],
    ["evaluate", NAME, "--task", "synthetic-zeroshot", "--workers", "0", "--device", "cpu", "--no-plots"],
])
def test_readers_name_the_checkpoint_and_the_mismatch(foreign, command):
    workspace, _, checkpoint = foreign
    result = CliRunner().invoke(app, [*command, "-w", str(workspace.root)])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert _sentence(checkpoint) + "pass a checkpoint of this run (--checkpoint), or move this one away" in said
    assert "Traceback" not in result.output and "size mismatch" not in said
    assert isinstance(result.exception, SystemExit)


def test_a_refused_resume_leaves_the_manifest_true(foreign):
    workspace, run_dir, checkpoint = foreign
    before = run_dir.manifest_file.read_text()
    assert json.loads(before)["status"] == "complete"
    from helpers import RECIPE, SMALL

    sets = [*SMALL, "proto.teacher=''", *ONE_EPISODE]
    result = CliRunner().invoke(app, ["train", str(RECIPE), *(x for s in sets for x in ("--set", s)),
                                      "-w", str(workspace.root)])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert _sentence(checkpoint) + "move it away to resume from the previous checkpoint, or start over with --no-resume." in said
    assert "Traceback" not in result.output
    assert run_dir.manifest_file.read_text() == before  # not 'running' with no process alive
    assert not run_dir.lock_file.exists()

"""The run folder (RunDir) and the one resolution of a run name, run folder or checkpoint file."""

from __future__ import annotations

import os
import time

import pytest

from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.runs import RunDir
from protoclip_cli.workspace import resolve
from protoclip_cli.workspace import Workspace


def make_run(workspace: Workspace, name: str, checkpoints: tuple[int, ...] = (8,), mtime: float | None = None) -> RunDir:
    """A run folder as train leaves it (a recipe and checkpoint files; their contents are not read here)."""
    run = RunDir(workspace.run_dir(name))
    run.path.mkdir(parents=True)
    run.config_file.write_text(f'name = "{name}"\n')
    run.checkpoints_dir.mkdir()
    for step in checkpoints:
        (run.checkpoints_dir / f"step-{step:08d}.pt").write_bytes(b"")
    if mtime is not None:
        os.utime(run.config_file, (mtime, mtime))
    return run


def test_layout_is_spelled_in_one_place(tmp_path):
    run = RunDir(tmp_path / "runs" / "r")
    expected = {
        run.config_file: "config.toml", run.manifest_file: "manifest.json", run.checkpoints_dir: "checkpoints",
        run.plan_file: "episodes/plan.json", run.prototypes_file(3): "episodes/3/prototypes.h5",
        run.metrics_file: "metrics.jsonl", run.tensorboard_dir: "tensorboard", run.eval_dir: "eval",
        run.cluster_dir(3): "cluster/episode-3", run.export_file("RN50"): "export/r-RN50.pt",
        run.wandb_id_file: "wandb-run.txt", run.wandb_dir: "wandb",
    }  # fmt: skip
    for path, relative in expected.items():
        assert path == tmp_path / "runs" / "r" / relative
    assert run.training_state() == [
        run.checkpoints_dir, run.episodes_dir, run.tensorboard_dir, run.metrics_file, run.wandb_id_file,
    ]
    assert run.wandb_run_id() is None
    run.record_wandb_run_id("abc123")
    assert run.wandb_id_file.read_text() == "abc123\n" and run.wandb_run_id() == "abc123"


def test_a_name_resolves_in_the_workspace(tmp_path):
    workspace = Workspace.at(tmp_path / "ws")
    run = make_run(workspace, "r")
    resolved = resolve(workspace, "r")
    assert (resolved.run, resolved.checkpoint, resolved.workspace) == (run, None, workspace)
    assert resolved.run.checkpoint() == run.checkpoints_dir / "step-00000008.pt"  # None: the newest
    with pytest.raises(MissingInputError, match=r"No training run at .*ws/runs/missing \(config.toml is missing\)"):
        resolve(workspace, "missing")


def test_no_target_takes_the_latest_run_and_says_which(tmp_path, capsys):
    workspace = Workspace.at(tmp_path / "ws")
    with pytest.raises(MissingInputError, match="No run in .*protoclip train recipes/synthetic.toml"):
        resolve(workspace, "")
    make_run(workspace, "old", mtime=time.time() - 100)
    newer = make_run(workspace, "new")
    assert resolve(workspace, None).run == newer
    assert "Using run 'new' (the latest" in capsys.readouterr().err


def test_a_run_folder_brings_its_workspace_from_anywhere(tmp_path, monkeypatch, capsys):
    workspace = Workspace.at(tmp_path / "ws")
    run = make_run(workspace, "r")
    monkeypatch.chdir(tmp_path)
    elsewhere = Workspace.at(tmp_path / "default-workspace")  # what --workspace defaults to here
    for target in (str(run.path), "ws/runs/r"):
        resolved = resolve(elsewhere, target)
        assert resolved.run.path.resolve() == run.path.resolve()
        assert resolved.workspace.root.resolve() == workspace.root.resolve()
    assert "belongs to the workspace" in capsys.readouterr().err
    # A folder relative to the workspace (the README's `runs/NAME`) works from another directory.
    assert resolve(workspace, "runs/r").run.path == workspace.root / "runs" / "r"
    assert "belongs to the workspace" not in capsys.readouterr().err


def test_a_checkpoint_file_names_its_run_and_its_checkpoint(tmp_path):
    workspace = Workspace.at(tmp_path / "ws")
    run = make_run(workspace, "r", checkpoints=(8, 16))
    first = run.checkpoints_dir / "step-00000008.pt"
    resolved = resolve(Workspace.at(tmp_path / "other"), str(first))
    assert (resolved.run.path, resolved.checkpoint) == (run.path, first)
    assert resolved.workspace.root == workspace.root
    # --checkpoint overrides the one the target names.
    last = run.checkpoints_dir / "step-00000016.pt"
    assert resolve(workspace, str(first), checkpoint=str(last)).checkpoint == last


def test_files_outside_runs_and_runs_without_checkpoints_are_errors(tmp_path):
    workspace = Workspace.at(tmp_path / "ws")
    stray = tmp_path / "open_clip.pt"
    stray.write_bytes(b"")
    with pytest.raises(ProtoclipError, match="is not inside a run folder .*--open-clip ARCH --pretrained FILE"):
        resolve(workspace, str(stray))
    empty = make_run(workspace, "empty", checkpoints=())
    with pytest.raises(MissingInputError, match=r"has no checkpoint yet; train it first with `protoclip train .*config.toml`"):
        resolve(workspace, "empty").run.checkpoint()
    with pytest.raises(MissingInputError, match="Checkpoint .*nope.pt does not exist"):
        empty.checkpoint(tmp_path / "nope.pt")


def test_pick_episode(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(MissingInputError, match="has no episodes/<n>/prototypes.h5"):
        run.pick_episode("last")
    for episode in (1, 2, 10):
        run.episode_dir(episode).mkdir(parents=True)
        run.prototypes_file(episode).write_bytes(b"")
    run.episode_dir(11).mkdir()  # an episode being clustered: no prototypes.h5 yet
    assert run.pick_episode("last") == (10, run.prototypes_file(10))
    assert run.pick_episode("2") == (2, run.prototypes_file(2))
    with pytest.raises(MissingInputError, match="has no episode 5; it has 1, 2, 10"):
        run.pick_episode("5")
    with pytest.raises(ProtoclipError, match="--episode first is neither 'last' nor a number"):
        run.pick_episode("first")

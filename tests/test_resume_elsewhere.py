"""A run resumes on another number of ranks (gloo, CPU): 1 -> 2 at an episode boundary, and 2 -> 1
inside an episode, which restarts the episode's training pass and says so in one sentence.

One recipe for every launch: episodes of 2 shards of 32 samples, batches of 16, so an episode is 4
steps on one process and 2 on two (one shard per rank). A run of 3 episodes (warm-up, prototypes,
LiT) is trained on one process with a checkpoint every step; a copy of it stopped after episode 0
(its later checkpoints and prototypes removed, as a run killed there leaves it) resumes under
torchrun on two processes; a copy of that run stopped after one step of episode 2 resumes on one
process. The learning rate follows the episodes: each keeps its span of the first launch's
schedule, spread over its steps, so the two-rank steps take every second rate of the one-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import cli, small_config, write_tiny_dataset
from protoclip_cli import config as config_io
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.core.optim import cosine_schedule
from protoclip_cli.stages import train
from protoclip_cli.training.episodes import EpisodePlan, ResumePoint, RunLayout, resumed_layout
from protoclip_cli.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SETS = ("name='elsewhere'", "device='cpu'", "data.episode_size=64", "data.batch_size=16", "schedule.episodes=3",
        "schedule.lit_start_episode=-1", "schedule.warmup_steps=2", "logging.checkpoint_every_steps=1",
        "logging.keep_checkpoints=20")


def test_the_schedule_follows_the_episodes_when_the_steps_change():
    plan = EpisodePlan([["a", "b"], ["c", "d"]], {s: 64 for s in "abcd"}, 0, 128)
    config = small_config("data.batch_size=32", "data.workers=0", "schedule.episodes=2", "schedule.lit_start_episode=99")
    same = RunLayout([4, 4], None)
    assert same.schedule_positions().tolist() == list(range(8))  # a run on its first layout: unchanged
    # 1 -> 2 ranks after episode 0: episode 1 takes 2 steps over its 4-step span.
    boundary = resumed_layout(config, plan, 2, ResumePoint(0, 4, 1, [4, 4], [4, 4]))
    assert boundary.steps == [4, 2] and boundary.schedule_positions().tolist()[4:] == [4.0, 6.0]
    # 2 -> 1 rank one step into episode 1: that step, then a whole one-process pass of 4.
    inside = resumed_layout(config, plan, 1, ResumePoint(1, 1, 2, [2, 2], [2, 2]))
    assert inside.steps == [2, 5] and inside.schedule_positions().tolist()[2:] == [2.0, 2.4, 2.8, 3.2, 3.6]
    # The same number of ranks keeps the checkpoint's layout, a restarted episode included.
    assert resumed_layout(config, plan, 1, ResumePoint(1, 3, 1, [2, 5], [2, 2])).steps == [2, 5]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    workspace = Workspace.at(tmp_path_factory.mktemp("elsewhere") / "ws")
    write_tiny_dataset(workspace, per_shard=32)
    return workspace


def _recipe(workspace: Workspace) -> tuple[TrainConfig, Path]:
    config = small_config(*SETS)
    path = workspace.root / "elsewhere.toml"
    path.write_text(config_io.dumps(config))
    return config, path


def _stopped_copy(run: Path, into: Workspace, step: int, episodes_made: int) -> Path:
    """The run folder as a run killed after checkpoint ``step`` leaves it, in workspace ``into``."""
    if not into.datasets_dir.exists():
        into.datasets_dir.mkdir(parents=True)
        (into.datasets_dir / "synthetic").symlink_to(run.parent.parent / "datasets" / "synthetic")
    copy = into.run_dir(run.name)
    shutil.copytree(run, copy)
    for checkpoint in (copy / "checkpoints").glob("step-*.pt"):
        if int(checkpoint.stem[5:]) > step:
            checkpoint.unlink()
    for episode in (copy / "episodes").iterdir():
        if episode.is_dir() and int(episode.name) >= episodes_made:
            shutil.rmtree(episode)
    return copy


def _steps(run: Path) -> dict[int, dict]:
    return {l["step"]: l for l in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if l["kind"] == "step"}


def _keys(run: Path, episode: int) -> np.ndarray:
    with h5py.File(run / "episodes" / str(episode) / "prototypes.h5", "r") as f:
        return f["keys"][:]


@pytest.mark.integration
def test_a_run_resumes_on_two_ranks_after_an_episode_and_on_one_inside_one(workspace, tmp_path):
    config, recipe = _recipe(workspace)
    train.run(config, workspace)  # one process: 3 episodes of 4 steps
    one = workspace.run_dir("elsewhere")
    reference = _steps(one)
    assert json.loads((one / "manifest.json").read_text())["steps_per_episode"] == [4, 4, 4]

    # 1 -> 2: stopped after episode 0, resumed under torchrun on two ranks.
    wider = Workspace.at(tmp_path / "two")
    two = _stopped_copy(one, wider, step=4, episodes_made=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    launch = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "protoclip_cli", "train",
                             str(recipe), "--workspace", str(wider.root)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert "Resuming from step-00000004.pt: episode 1, 0 of its batches done" in " ".join(launch.stderr.split())
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert manifest["steps_per_episode"] == [4, 2, 2] and manifest["global_step"] == 8
    assert (two / "episodes" / "plan.json").read_text() == (one / "episodes" / "plan.json").read_text()
    # Episode 1 was re-split over the two ranks: its prototypes cover all of its samples.
    assert np.array_equal(_keys(two, 1), _keys(one, 1)) and len(_keys(two, 1)) == 64
    resumed = _steps(two)
    for step, original in ((5, 5), (6, 7), (7, 9), (8, 11)):  # every second rate of the first launch
        assert resumed[step]["lr"] == pytest.approx(reference[original]["lr"], rel=1e-12)
        assert resumed[step]["phase"] == reference[original]["phase"]
    assert resumed[7]["lr_visual"] == 0.0 and resumed[7]["phase"] == "lit"

    # 2 -> 1: stopped after the first of episode 2's two steps, resumed on one process.
    narrower = Workspace.at(tmp_path / "one")
    back = _stopped_copy(two, narrower, step=7, episodes_made=2)
    result = cli("train", str(recipe), "--workspace", str(narrower.root))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert ("Checkpoint step-00000007.pt was written by 2 process(es) inside episode 2 (1 of its 2 steps done), "
            "whose data cannot be continued exactly on 1, so the episode's training pass restarts from its first "
            "batch with the checkpoint's weights (4 more steps).") in said
    manifest = json.loads((back / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 1
    assert manifest["steps_per_episode"] == [4, 2, 5] and manifest["global_step"] == 11
    lines = _steps(back)
    assert sorted(lines) == list(range(1, 12))
    # Episode 2's span of the schedule (steps 8-11 of the first launch) over its 5 steps.
    expected = cosine_schedule(config.optim.lr, config.schedule.warmup_steps, 12, positions=np.array([8 + 4 * 1 / 5]))
    assert lines[8]["lr"] == pytest.approx(float(expected[0]), rel=1e-12) and lines[8]["lr_visual"] == 0.0

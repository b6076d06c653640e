"""A launch that train refuses under torchrun says so once, by rank 0, with a non-zero status that a
job script sees; the run's manifest and lock are as they were. (torchrun adds its own summary of the
failed ranks.) Two refusals: one that rank 0 decides before the ranks start (another recipe in the
run folder), one that every rank meets while loading the checkpoint (another number of data
workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import linked_workspace
from protoclip_cli.runs import RunDir
from helpers import RECIPE, REPO, SMALL

NAME = "one-process"
SETS = [*SMALL, "proto.teacher=''", "schedule.episodes=1", "proto.enabled=false", "model.heads=false", "device='cpu'",
        f"name='{NAME}'"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(synthetic_workspace, tmp_path_factory):
    from protoclip_cli import config as config_io
    from protoclip_cli.configs.train import TrainConfig
    from protoclip_cli.stages.train import run

    workspace = linked_workspace(synthetic_workspace, tmp_path_factory.mktemp("refusal") / "ws")
    run(config_io.load(TrainConfig, RECIPE, SETS), workspace)
    return workspace


def _torchrun(workspace, processes: int, *extra: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", str(processes), "-m", "protoclip_cli", "train", str(RECIPE),
         *(x for s in (*SETS, *extra) for x in ("--set", s)), "-w", str(workspace.root)],
        capture_output=True, text=True, timeout=600, env=env,
    )


def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_two_ranks_refusing_another_recipe_say_it_once(one_process_run):
    run_dir = RunDir(one_process_run.run_dir(NAME))
    manifest = run_dir.manifest_file.read_text()
    done = _torchrun(one_process_run, 2, "optim.lr=0.5")
    said = " ".join((done.stdout + done.stderr).split())
    sentence = (f"error: Run folder {run_dir.path} holds a run with another configuration (differs in optim.lr); "
                "pick another run name with --set name=NEW_NAME, or delete the folder.")
    assert said.count("error: Run folder") == 1 and sentence in said, said[-3000:]
    assert done.returncode != 0
    assert run_dir.manifest_file.read_text() == manifest and not run_dir.lock_file.exists()


def test_two_ranks_refusing_a_checkpoint_of_other_workers_say_it_once(one_process_run):
    """Every rank refuses the checkpoint while loading it; the sentence still comes once."""
    run_dir = RunDir(one_process_run.run_dir(NAME))
    manifest = run_dir.manifest_file.read_text()
    checkpoint = run_dir.latest_checkpoint()
    state = torch.load(checkpoint, weights_only=True)
    state["workers"] = 3
    torch.save(state, checkpoint)
    done = _torchrun(one_process_run, 2)
    said = " ".join(_lines(done))
    sentence = (f"error: Checkpoint {checkpoint.name} was written with 3 data worker(s) per process; resume with "
                "data.workers = 3, or start over with --no-resume.")
    assert said.count(sentence) == 1 and done.returncode != 0, said[-3000:]
    assert run_dir.manifest_file.read_text() == manifest and not run_dir.lock_file.exists()

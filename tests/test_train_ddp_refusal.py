"""A launch that train refuses under torchrun (here: resuming a run with another number of
processes) says so once, by rank 0, with a non-zero status that a job script sees; the run's
manifest and lock are as they were. (torchrun adds its own summary of the failed ranks.)"""

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


def _torchrun(workspace, processes: int) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", str(processes), "-m", "protoclip_cli", "train", str(RECIPE),
         *(x for s in SETS for x in ("--set", s)), "-w", str(workspace.root)],
        capture_output=True, text=True, timeout=600, env=env,
    )


def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_two_ranks_refusing_a_one_process_run_say_it_once(one_process_run):
    run_dir = RunDir(one_process_run.run_dir(NAME))
    manifest = run_dir.manifest_file.read_text()
    checkpoint = run_dir.latest_checkpoint()
    done = _torchrun(one_process_run, 2)
    said = " ".join((done.stdout + done.stderr).split())
    sentence = (f"error: Checkpoint {checkpoint.name} was written by 1 process(es) x 0 data worker(s); resume with the "
                "same launch, or start over with --no-resume.")
    assert said.count("error: Checkpoint") == 1 and sentence in said, said[-3000:]
    assert done.returncode != 0
    assert run_dir.manifest_file.read_text() == manifest and not run_dir.lock_file.exists()


def test_one_process_refusing_a_two_rank_run_says_it_once(one_process_run):
    """The issue's case: the run was trained by 2 ranks (its checkpoint says so), resumed by 1."""
    run_dir = RunDir(one_process_run.run_dir(NAME))
    checkpoint = run_dir.latest_checkpoint()
    state = torch.load(checkpoint, weights_only=True)
    state["world_size"] = 2
    torch.save(state, checkpoint)
    done = _torchrun(one_process_run, 1)
    said = " ".join(_lines(done))
    sentence = (f"error: Checkpoint {checkpoint.name} was written by 2 process(es) x 0 data worker(s); resume with the "
                "same launch, or start over with --no-resume.")
    assert said.count(sentence) == 1 and done.returncode != 0

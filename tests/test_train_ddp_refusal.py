"""A launch that train refuses under torchrun (here: resuming a run with another number of
processes) says so once, by rank 0, as the last line: torchrun reports any non-zero status of a
worker as a 30-line ChildFailedError after it (and restarts such a launch with --max-restarts),
so under torchrun a refusal ends every rank with status 0 and torchrun adds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import linked_workspace
from protoclip_cli.runs import RunDir
from test_train import RECIPE, SMALL

NAME = "one-process"
SETS = [*SMALL, "proto.teacher=''", "schedule.episodes=1", "proto.enabled=false", "model.heads=false", "device='cpu'",
        f"name='{NAME}'"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(synthetic_workspace, tmp_path_factory):
    from protoclip_cli import config as config_io
    from protoclip_cli.recipes import TrainConfig
    from protoclip_cli.stages.train import run

    workspace = linked_workspace(synthetic_workspace, tmp_path_factory.mktemp("refusal") / "ws")
    run(config_io.load(TrainConfig, RECIPE, SETS), workspace)
    return workspace


def _torchrun(workspace, processes: int) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(RECIPE).parents[1])}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", str(processes), "-m", "protoclip_cli", "train", str(RECIPE),
         *(x for s in SETS for x in ("--set", s)), "-w", str(workspace.root)],
        capture_output=True, text=True, timeout=600,
    )


def _last_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_two_ranks_refusing_a_one_process_run_say_it_once_and_last(one_process_run):
    run_dir = RunDir(one_process_run.run_dir(NAME))
    manifest = run_dir.manifest_file.read_text()
    checkpoint = run_dir.latest_checkpoint()
    done = _torchrun(one_process_run, 2)
    said = " ".join((done.stdout + done.stderr).split())
    sentence = (f"error: Checkpoint {checkpoint.name} was written by 1 process(es) x 0 data worker(s); resume with the "
                "same launch, or start over with --no-resume.")
    assert said.count("error: Checkpoint") == 1 and said.endswith(sentence), said[-3000:]
    assert "ChildFailedError" not in said and "Traceback" not in said
    assert done.returncode == 0
    assert run_dir.manifest_file.read_text() == manifest and not run_dir.lock_file.exists()


def test_one_process_refusing_a_two_rank_run_says_it_last(one_process_run):
    """The issue's case: the run was trained by 2 ranks (its checkpoint says so), resumed by 1."""
    run_dir = RunDir(one_process_run.run_dir(NAME))
    checkpoint = run_dir.latest_checkpoint()
    state = torch.load(checkpoint, weights_only=True)
    state["world_size"] = 2
    torch.save(state, checkpoint)
    done = _torchrun(one_process_run, 1)
    assert _last_lines(done)[-1] == (f"error: Checkpoint {checkpoint.name} was written by 2 process(es) x 0 data "
                                     "worker(s); resume with the same launch, or start over with --no-resume.")
    assert "ChildFailedError" not in done.stderr and done.returncode == 0

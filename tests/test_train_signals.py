"""SIGTERM (SLURM's time limit, Kubernetes' preemption), SLURM's ``--signal=USR1@N`` and Ctrl-C stop
`protoclip train` through one path: the step in progress finishes, a checkpoint of it is written,
and the command ends with one sentence and the signal's exit status (143, 138, 130). A requeued job
then loses no step: the SIGTERM'd run resumes to the same final weights as an uninterrupted one.

The signals go to a real `protoclip train` child started by the test (to its process group, data-
loader workers included, as SLURM and a terminal send them), never to any other process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protoclip_cli.configs import recipes
from protoclip_cli.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
RECIPE = recipes.path("synthetic")
# 2 episodes (warm-up, prototypes) of 2 shards, 8 steps each, read by 2 workers; no periodic
# checkpoints, so the only one inside an episode is the one the signal asks for.
SETS = [
    "data.episode_size=256", "data.batch_size=32", "data.workers=2", "data.augmentation='light'",
    "data.shuffle_buffer=64", "data.extract_batch_size=128", "model.projection_dim=32",
    "model.projection_hidden_dim=64", "proto.k=8", "proto.iterations=3", "proto.restarts=1", "proto.teacher=''",
    "optim.lr=5e-4", "schedule.episodes=2", "schedule.warmup_steps=4", "schedule.lit_start_episode=99",
    "logging.log_every_steps=1", "logging.checkpoint_every_steps=0", "logging.keep_checkpoints=4", "device='cpu'",
]


def _command(workspace: Path, name: str, *extra: str) -> list[str]:
    sets = [*SETS, *extra, f"name='{name}'"]
    return [sys.executable, "-m", "protoclip_cli", "train", str(RECIPE), *(x for s in sets for x in ("--set", s)),
            "--workspace", str(workspace)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _steps_logged(run_dir: RunDir) -> list[int]:
    if not run_dir.metrics_file.is_file():
        return []
    steps = []
    for line in run_dir.metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record.get("kind") == "step":
            steps.append(record["step"])
    return steps


def _signal_after(workspace: Path, name: str, signum: int, step: int, *extra: str) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, send ``signum`` to its process group once ``step`` is logged; (the ended process,
    the last step logged when the signal was sent)."""
    run_dir = RunDir(workspace / "runs" / name)
    process = subprocess.Popen(_command(workspace, name, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and max(_steps_logged(run_dir), default=0) < step:
        time.sleep(0.02)
    seen = max(_steps_logged(run_dir), default=0)
    assert process.poll() is None, process.communicate()[1][-3000:]
    os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), seen


def test_a_sigtermd_run_checkpoints_its_step_and_resumes_to_the_same_weights(synthetic_workspace):
    workspace = synthetic_workspace.root
    name, reference = "sigterm-stopped", "sigterm-reference"
    run_dir = RunDir(workspace / "runs" / name)
    stopped, seen = _signal_after(workspace, name, signal.SIGTERM, 3)

    assert stopped.returncode == 143, stopped.stderr[-3000:]
    checkpoint = run_dir.latest_checkpoint()
    step = int(checkpoint.stem.split("-")[1])
    assert seen <= step <= seen + 1 < 8  # the next step boundary, inside episode 0
    assert max(_steps_logged(run_dir)) == step  # every step done is in the checkpoint: none lost
    said = " ".join(stopped.stderr.split())
    assert (f"error: Training stopped by SIGTERM at step {step} of 16 (episode 0); rerunning the same command "
            f"resumes from {checkpoint.name} (step {step}).") in said
    assert "Traceback" not in stopped.stderr and "DataLoader worker" not in stopped.stderr
    manifest = json.loads(run_dir.manifest_file.read_text())
    assert manifest["status"] == "interrupted" and manifest["last_checkpoint"] == str(checkpoint)
    assert not run_dir.lock_file.exists()

    resumed = subprocess.run(_command(workspace, name), cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint.name}: episode 0, {step} of its batches done" in " ".join(resumed.stderr.split())
    whole = subprocess.run(_command(workspace, reference), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    final = torch.load(run_dir.checkpoints_dir / "step-00000016.pt", weights_only=True)["model"]
    expected = torch.load(workspace / "runs" / reference / "checkpoints" / "step-00000016.pt", weights_only=True)["model"]
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert _steps_logged(run_dir) == list(range(1, 17))


@pytest.mark.parametrize("signum, code, said", [(signal.SIGUSR1, 138, "SIGUSR1"), (signal.SIGINT, 130, "Ctrl-C")])
def test_slurms_warning_and_ctrl_c_also_checkpoint_the_step_they_stop_at(synthetic_workspace, signum, code, said):
    workspace = synthetic_workspace.root
    name = f"stopped-by-{signal.Signals(signum).name.lower()}"
    run_dir = RunDir(workspace / "runs" / name)
    one_episode = ["schedule.episodes=1", "proto.enabled=false", "model.heads=false"]
    stopped, seen = _signal_after(workspace, name, signum, 2, *one_episode)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    checkpoint = run_dir.latest_checkpoint()
    step = int(checkpoint.stem.split("-")[1])
    assert seen <= step <= seen + 1 < 8 and max(_steps_logged(run_dir)) == step
    assert (f"error: Training stopped by {said} at step {step} of 8 (episode 0); rerunning the same command resumes "
            f"from {checkpoint.name} (step {step}).") in " ".join(stopped.stderr.split())
    assert "Traceback" not in stopped.stderr
    assert json.loads(run_dir.manifest_file.read_text())["status"] == "interrupted"
    assert not run_dir.lock_file.exists()

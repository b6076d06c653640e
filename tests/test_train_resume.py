"""Resume after SIGKILL in the middle of an episode: the resumed run ends with the same weights as an
uninterrupted one (exactly: same data order, augmentation seeded per sample, optimiser and RNG state
restored), and a stray temporary checkpoint left by the kill is never read.

Two data-loader workers and the ``light`` augmentation (crop in the workers, the rest on the device)
make it strict: killed after an odd number of steps, the workers have given different numbers of
batches, and the resumed loader must skip each one's own records and restore the canonical order.
In single-pass mode the recording of the killed pass travels in the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from protoclip_cli.configs import recipes

REPO = Path(__file__).resolve().parents[1]
RECIPE = recipes.path("synthetic")
# 2 episodes (warm-up, prototypes) of 2 shards, 8 steps each (one shard per worker); a checkpoint every 3 steps.
ARGS = [
    "--set", "data.episode_size=256", "--set", "data.batch_size=32", "--set", "data.workers=2",
    "--set", "data.augmentation='light'", "--set", "data.shuffle_buffer=64", "--set", "data.extract_batch_size=128",
    "--set", "model.projection_dim=32", "--set", "model.projection_hidden_dim=64",
    "--set", "proto.k=8", "--set", "proto.iterations=3", "--set", "proto.restarts=1", "--set", "proto.teacher=''",
    "--set", "optim.lr=5e-4", "--set", "schedule.episodes=2", "--set", "schedule.warmup_steps=4",
    "--set", "schedule.lit_start_episode=99",
    "--set", "logging.log_every_steps=1", "--set", "logging.checkpoint_every_steps=3", "--set", "logging.keep_checkpoints=3",
]


def _command(workspace: Path, name: str, mode: str) -> list[str]:
    # Single-pass clusters the warm-up pass's recording ('recorded'), so the recording of the killed
    # pass must travel in the checkpoint.
    single_pass = ["--set", "proto.single_pass=true", "--set", "proto.single_pass_start='recorded'"]
    return [sys.executable, "-m", "protoclip_cli", "train", str(RECIPE), *ARGS, "--set", f"name='{name}'",
            *(single_pass if mode == "single-pass" else []), "--workspace", str(workspace)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("mode", ["faithful", "single-pass"])
def test_killed_run_resumes_to_the_same_weights(synthetic_workspace, mode):
    workspace = synthetic_workspace.root
    killed, reference = f"resume-killed-{mode}", f"resume-reference-{mode}"
    run_dir = workspace / "runs" / killed
    process = subprocess.Popen(_command(workspace, killed, mode), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_checkpoint = run_dir / "checkpoints" / "step-00000003.pt"
    deadline = time.time() + 240
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    killed_at = max(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert killed_at < "step-00000008.pt"  # killed inside episode 0
    # A kill during a write leaves a hidden temporary file: it must be ignored.
    (run_dir / "checkpoints" / ".step-00000099.pt.abc.tmp").write_bytes(b"truncated")

    resumed = subprocess.run(_command(workspace, killed, mode), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(killed_at[5:13])
    assert f"Resuming from {killed_at}: episode 0, {step} of its batches done" in resumed.stderr.replace("\n", " ")

    reference_run = subprocess.run(_command(workspace, reference, mode), cwd=REPO, env=_env(), capture_output=True,
                               text=True, timeout=400)
    assert reference_run.returncode == 0, reference_run.stderr[-3000:]
    final = torch.load(run_dir / "checkpoints" / "step-00000016.pt", weights_only=True)
    expected = torch.load(workspace / "runs" / reference / "checkpoints" / "step-00000016.pt", weights_only=True)
    # Same computation in the same order on the same machine: bit-identical weights.
    assert final["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    # The prototypes of episode 1: extracted after the resume (faithful) or clustered from a recording
    # that the checkpoint carried across the kill (single-pass): the same either way.
    import h5py

    with h5py.File(run_dir / "episodes" / "1" / "prototypes.h5") as got, \
            h5py.File(workspace / "runs" / reference / "episodes" / "1" / "prototypes.h5") as want:
        assert np.array_equal(got["keys"][:], want["keys"][:])
        for group in ("image", "text"):
            assert np.array_equal(got[group]["centroids"][:], want[group]["centroids"][:]), group
        assert got.attrs.get("source_episode", -1) == (0 if mode == "single-pass" else -1)
    # metrics.jsonl has each step once, even though the killed run logged past its checkpoint.
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "step"]
    assert steps == list(range(1, 17))
    reference_losses = [json.loads(l) for l in (workspace / "runs" / reference / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l.get("total") for l in resumed_losses if l["kind"] == "step"] == [
        l.get("total") for l in reference_losses if l["kind"] == "step"
    ]

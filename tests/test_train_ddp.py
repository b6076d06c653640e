"""Distributed training: `torchrun --nproc_per_node 2 -m protoclip_cli train` (gloo on CPU) against one
process on the same global batches, and two processes started as `srun` starts its tasks (SLURM's
variables, no torchrun) against the torchrun pair.

How both runs see the same data. Episodes are 2 shards of 128 samples (the session data set has 4),
so each rank reads exactly one shard per episode, and the per-rank batch is a whole shard (128):
every step's global batch is the episode's 256 samples in both runs, whatever the shuffle order
(the losses are sums over the batch's pairs, so the order inside a batch does not matter, and each
sample's augmentation is seeded by its key, not by the rank that reads it). The extraction pass
numbers the episode's rows shard after shard in both runs (rank 0's rows first), so k-means starts
from the same points. Smaller batches could not give equal global batches: ranks split episodes by
shard, so a 2 x 32 step mixes two shards where a 64-sample step reads one.

Tolerances: the runs differ only in floating-point summation order (gathered vs whole-batch matmuls,
gloo's gradient average): losses, weights and centroids agree to about 2e-7 over the 4 steps. Losses
and temperatures must agree to 5e-6 relative, weights to 5e-6 absolute, prototype centroids to 1e-5;
cluster labels exactly. The heads have no hidden layer (``projection_n_layers = 0``) because their
BatchNorm normalises per process on CPU, which would make the prototype terms differ by design, not
by rounding. AdamW's epsilon is raised to 1e-3 so that an update depends on the gradient's size (with
the default 1e-8 an update is nearly sign(gradient) and a wrong gradient scale would go unseen) and
rounding noise in gradients that are zero in exact arithmetic is not amplified to a full step.
Both runs use ``optim.ddp_gradients = 'global-batch'``, under which the distributed gradient is the
one-process gradient by definition; the reference's default scaling is pinned in
test_ddp_gradients.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from protoclip_cli.core.slurm import rendezvous_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "synthetic.toml"
SHARD = 128  # samples per shard of the session data set (tests/conftest.py)
EPISODES = 4  # warm-up, two prototype episodes, the LiT finish: one step each
PROTO_EPISODES = (1, 2)
LOSS_RTOL = 5e-6
WEIGHT_ATOL = 5e-6

COMMON = [
    "device='cpu'", "data.episode_size=256", "data.workers=0", "data.augmentation='rrc'",
    "data.shuffle_buffer=64", "data.extract_batch_size=96",
    "model.projection_dim=32", "model.projection_hidden_dim=64", "model.projection_n_layers=0",
    "proto.k=8", "proto.teacher_k=6", "proto.iterations=5", "proto.restarts=2", "proto.backend='torch'",
    "optim.lr=1e-3", "optim.eps=1e-3", "optim.grad_clip=10.0", "optim.ddp_gradients='global-batch'",
    f"schedule.episodes={EPISODES}", "schedule.warmup_steps=2", "schedule.infonce_warmup_episodes=1",
    "schedule.lit_start_episode=-1",
    "logging.log_every_steps=1", "logging.checkpoint_every_steps=0", f"logging.keep_checkpoints={EPISODES}",
]


def _train_args(workspace: Path, name: str, batch_size: int, teacher: str) -> list[str]:
    sets = [*COMMON, f"data.batch_size={batch_size}", f"proto.teacher='{teacher}'", f"name='{name}'"]
    return ["train", str(RECIPE), *[arg for s in sets for arg in ("--set", s)], "--workspace", str(workspace)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command[:6])} ... failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def runs(synthetic_teacher, synthetic_workspace):
    """The same recipe trained by 2 ranks x 128 samples and by 1 process x 256 samples."""
    root, teacher = synthetic_workspace.root, Path(synthetic_teacher).stem
    torchrun = Path(sys.executable).with_name("torchrun")
    # --standalone: a local rendezvous on a free port, so parallel test sessions never collide.
    ddp = _run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "protoclip_cli",
                *_train_args(root, "ddp-two-ranks", SHARD, teacher)])
    single = _run([sys.executable, "-m", "protoclip_cli", *_train_args(root, "ddp-one-process", 2 * SHARD, teacher)])
    return {
        "ddp": (root / "runs" / "ddp-two-ranks", ddp),
        "single": (root / "runs" / "ddp-one-process", single),
    }


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)


def test_each_rank_reads_one_whole_shard_per_episode(runs):
    ddp_dir, single_dir = runs["ddp"][0], runs["single"][0]
    plan = json.loads((ddp_dir / "episodes" / "plan.json").read_text())
    # The comparison's premise: per-rank batch = one shard, so a step's global batch is the episode.
    assert plan == json.loads((single_dir / "episodes" / "plan.json").read_text())
    assert [len(e) for e in plan["episodes"]] == [2] * EPISODES
    assert all(plan["counts"][s] == SHARD for e in plan["episodes"] for s in e)


def test_rank_zero_alone_writes_the_documented_artifacts(runs):
    for key, world_size in (("ddp", 2), ("single", 1)):
        run_dir, process = runs[key]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["world_size"] == world_size
        assert manifest["total_steps"] == manifest["global_step"] == EPISODES
        assert manifest["steps_per_episode"] == [1] * EPISODES
        assert manifest["final_checkpoint"] == str(run_dir / "checkpoints" / f"step-{EPISODES:08d}.pt")
        # The final checkpoint printed once, one "done" line, one metrics line per step and episode:
        # the second rank neither prints nor logs.
        assert process.stdout == manifest["final_checkpoint"] + "\n"
        assert process.stderr.count("done: run") == 1
        lines = _metrics(run_dir)
        assert [l["step"] for l in lines if l["kind"] == "step"] == list(range(1, EPISODES + 1))
        assert [l["episode"] for l in lines if l["kind"] == "episode"] == list(range(EPISODES))
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
            f"step-{s:08d}.pt" for s in range(1, EPISODES + 1)
        ]
        assert sorted(p.name for p in (run_dir / "episodes").iterdir()) == [*map(str, PROTO_EPISODES), "plan.json"]
        assert not [p for p in run_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
        assert _checkpoint(run_dir, EPISODES)["world_size"] == world_size


def test_every_step_has_the_losses_of_one_process(runs):
    ddp = [l for l in _metrics(runs["ddp"][0]) if l["kind"] == "step"]
    single = [l for l in _metrics(runs["single"][0]) if l["kind"] == "step"]
    assert [l["phase"] for l in single] == ["warmup", "proto", "proto", "lit"]
    for got, want in zip(ddp, single, strict=True):
        assert got["phase"] == want["phase"] and got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        terms = ["total", "clip", "logit_scale", "logit_scale_proto"]
        if want["phase"] == "proto":
            terms += ["proto", "ext", "proto_img2txt", "proto_txt2img", "ext_img", "ext_txt"]
        else:
            assert got["total"] == got["clip"] and "proto" not in got
        for term in terms:
            assert math.isfinite(want[term])
            assert got[term] == pytest.approx(want[term], rel=LOSS_RTOL), (got["step"], term)
        # Accuracies are counts over the 256 samples of the step: equal up to a near-tie.
        for accuracy in {"acc_img2txt", "acc_txt2img", "acc_img2ext", "acc_txt2ext"} & set(want):
            assert abs(got[accuracy] - want[accuracy]) <= 1 / (2 * SHARD) + 1e-9, (got["step"], accuracy)


def test_prototype_files_match_one_process(runs):
    for episode in PROTO_EPISODES:
        paths = [runs[key][0] / "episodes" / str(episode) / "prototypes.h5" for key in ("ddp", "single")]
        with h5py.File(paths[0], "r") as got, h5py.File(paths[1], "r") as want:
            assert np.array_equal(got["keys"][:], want["keys"][:]) and len(want["keys"]) == 2 * SHARD
            attrs = {k: got.attrs[k] for k in ("episode", "k", "teacher_k")}
            assert attrs == {"episode": episode, "k": 8, "teacher_k": 6}
            for group in ("image", "text", "teacher"):
                assert np.array_equal(got[group]["labels"][:], want[group]["labels"][:]), (episode, group)
                np.testing.assert_allclose(got[group]["centroids"][:], want[group]["centroids"][:], atol=1e-5, rtol=0)
                assert got.attrs[f"objective_{group}"] == pytest.approx(want.attrs[f"objective_{group}"], rel=1e-5)
            for name in ("image/in_text", "text/in_image", "teacher/in_image", "teacher/in_text"):
                np.testing.assert_allclose(got[name][:], want[name][:], atol=1e-5, rtol=0, err_msg=f"{episode} {name}")
            # More than one cluster in use: equal labels are not a degenerate all-one-cluster result.
            assert len(np.unique(want["image"]["labels"][:])) > 1


def test_weights_after_every_step_match_one_process(runs):
    first = _checkpoint(runs["single"][0], 1)["model"]
    for step in range(1, EPISODES + 1):
        got = _checkpoint(runs["ddp"][0], step)["model"]
        want = _checkpoint(runs["single"][0], step)["model"]
        assert got.keys() == want.keys()
        for name, value in want.items():
            difference = (got[name] - value).abs().max()
            assert torch.allclose(got[name], value, rtol=0, atol=WEIGHT_ATOL), (step, name, difference)
    # The training moved the weights far more than the tolerance: the agreement is not vacuous.
    moved = max((want[n] - first[n]).abs().max().item() for n in want if want[n].is_floating_point())
    assert moved > 100 * WEIGHT_ATOL
    temperature = [n for n in want if n.endswith("logit_scale_proto")]
    assert temperature and not torch.equal(want[temperature[0]], first[temperature[0]])


def _free_job_id() -> str:
    """A SLURM job id whose derived rendezvous port is free now (parallel test sessions never collide)."""
    for job in random.sample(range(1, 10**6), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", rendezvous_port(str(job), "0")))
            except OSError:
                continue
        return str(job)
    raise AssertionError("no free port in the derived range")


def test_srun_tasks_without_torchrun_train_as_the_torchrun_pair(runs, synthetic_teacher, synthetic_workspace):
    """`srun python -m protoclip_cli train`: two tasks that know only SLURM's variables (a compressed
    node list whose first host is this machine) join one gloo group and give the torchrun pair's
    weights bit for bit (same ranks, same batches, same reductions)."""
    root, teacher = synthetic_workspace.root, Path(synthetic_teacher).stem
    job = _free_job_id()
    slurm = {"SLURM_NTASKS": "2", "SLURM_NODELIST": "localhost,gpu[02-03]", "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
             "SLURM_TASKS_PER_NODE": "2,1(x2)", "SLURM_NODEID": "0"}
    env = {name: value for name, value in _env().items()
           if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, "-m", "protoclip_cli", *_train_args(root, "ddp-srun", SHARD, teacher)]
    tasks = [subprocess.Popen(command, cwd=REPO, env={**env, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    for task, (_, stderr) in zip(tasks, outputs):
        assert task.returncode == 0, stderr[-3000:]
    run_dir = root / "runs" / "ddp-srun"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert outputs[0][0] == manifest["final_checkpoint"] + "\n" and outputs[1][0] == ""  # rank 0 alone prints
    for step in range(1, EPISODES + 1):
        got, want = _checkpoint(run_dir, step)["model"], _checkpoint(runs["ddp"][0], step)["model"]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[name], want[name]) for name in want), step

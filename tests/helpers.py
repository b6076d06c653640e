"""What several test modules share: the small run settings, the shared evaluation run, a tiny data
set written straight to shards, and the CLI runner. Fixtures that use them live in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

from protoclip_cli import config as config_io
from protoclip_cli.artifacts import write_manifest
from protoclip_cli.configs import recipes
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.data import synthetic
from protoclip_cli.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
RECIPE = recipes.path("synthetic")
RUN = "eval-fixture"  # the run the evaluate, cluster and export tests read

# 3 episodes of 2 shards (256 samples): InfoNCE warm-up, one prototype episode, the LiT finish.
SMALL = [
    "data.episode_size=256", "data.batch_size=32", "data.workers=0", "data.augmentation='rrc'",
    "data.shuffle_buffer=64", "data.extract_batch_size=128",
    "model.projection_dim=32", "model.projection_hidden_dim=64",
    "proto.k=8", "proto.teacher_k=6", "proto.iterations=5", "proto.restarts=1",
    "optim.lr=1e-3", "schedule.episodes=3", "schedule.warmup_steps=4",
    "logging.log_every_steps=1", "logging.checkpoint_every_steps=0", "logging.keep_checkpoints=2",
]  # fmt: skip


def small_config(*extra: str, teacher: str = "") -> TrainConfig:
    """The shipped synthetic recipe at test size (:data:`SMALL`), with ``extra`` overrides."""
    return config_io.load(TrainConfig, RECIPE, [*SMALL, f"proto.teacher='{teacher}'", *extra])


def train_shared_run(workspace, teacher_path: Path) -> Path:
    """Train the evaluation run once per test session (later callers find its final checkpoint)."""
    from protoclip_cli.stages import train

    run_dir = workspace.run_dir(RUN)
    manifest = run_dir / "manifest.json"
    if RunDir(run_dir).latest_checkpoint() is not None and manifest.is_file():
        if json.loads(manifest.read_text()).get("status") == "complete":
            return run_dir
    overrides = [
        f"name={RUN}", "device=cpu", "data.workers=0", "data.episode_size=256", "data.batch_size=64",
        "schedule.episodes=12", "schedule.warmup_steps=8", "proto.k=12", "proto.teacher_k=12", "proto.restarts=1",
        f'proto.teacher="{teacher_path.stem}"', "optim.lr=2e-3", "logging.checkpoint_every_steps=0",
    ]
    train.run(config_io.load(TrainConfig, RECIPE, overrides), workspace)
    return run_dir


def write_tiny_dataset(workspace, name: str = "synthetic", train: int = 256, heldout: int = 128,
                       per_shard: int = 64) -> None:
    """The embedded set's scenes written straight to shards with the manifest `download` writes (no
    img2dataset, seconds instead of a download): for fast tests of what comes after the download."""
    splits = {}
    for split, count in (("train", train), ("heldout", heldout)):
        folder = workspace.split_dir(name, split)
        folder.mkdir(parents=True, exist_ok=True)
        shards = [synthetic.write_shard(folder, shard, (synthetic.scene(i, 0, split) for i in range(start, min(start + per_shard, count))))[0]
                  for shard, start in enumerate(range(0, count, per_shard))]
        splits[split] = {"shards": shards, "count_ok": count, "count_failed": 0}
    write_manifest(workspace.dataset_dir(name), "download", {"source": "synthetic", "written": "tests"}, name=name,
                   source="synthetic", count_ok=train + heldout, count_failed=0, splits=splits,
                   ground_truth=synthetic.ground_truth())


def cli(*args: str):
    """``protoclip ARGS`` in this process (typer's runner), with stderr apart."""
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    return CliRunner().invoke(app, list(args))

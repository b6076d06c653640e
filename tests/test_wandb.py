"""wandb logging (`logging.wandb = true`), offline: every metrics.jsonl record reaches wandb at its
global step, and a resumed run continues the same wandb run. The offline run files (wandb's
record log, `run-<id>.wandb`) are read back with wandb's own protobuf schema."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import linked_workspace

from protoclip_cli import config as config_io
from protoclip_cli.configs import recipes
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.training.metrics import wandb_values

torch.set_num_threads(2)
RECIPE = recipes.path("synthetic")
# 2 episodes (InfoNCE warm-up, prototypes) of 2 shards = 4 steps each; a checkpoint every 2 steps.
OVERRIDES = [
    "name='wandb-run'", "device='cpu'", "data.episode_size=256", "data.batch_size=64", "data.workers=0",
    "data.augmentation='rrc'", "data.shuffle_buffer=64", "model.projection_dim=32", "model.projection_hidden_dim=64",
    "proto.k=8", "proto.iterations=3", "proto.restarts=1", "proto.teacher=''", "schedule.episodes=2",
    "schedule.warmup_steps=2", "schedule.lit_start_episode=99", "logging.log_every_steps=1",
    "logging.checkpoint_every_steps=2", "logging.keep_checkpoints=8", "logging.wandb=true",
    "logging.wandb_project='protoclip-tests'", "logging.wandb_entity='vision-lab'", "logging.wandb_name='tiny run'",
]


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic 0xBEE1, version),
    then LevelDB-log blocks of 32 KiB holding chunks (crc32, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_run(path: Path) -> tuple[str, dict[int, dict[str, float]]]:
    """(run id, history by step) of one offline run file."""
    run_id, history = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in values.items() if not k.startswith("_")}
    return run_id, history


def offline_run_record(path: Path):
    """The run record (id, project, entity, display name, config) of one offline run file."""
    return next(record.run for record in wandb_records(path) if record.WhichOneof("record_type") == "run")


def test_records_become_wandb_values():
    step = {"kind": "step", "step": 7, "episode": 1, "phase": "proto", "total": 2.5, "lr": 1e-4, "flag": True}
    assert wandb_values(step) == {"episode": 1, "total": 2.5, "lr": 1e-4}
    episode = {"kind": "episode", "step": 8, "episode": 1, "phase": "proto", "seconds": {"extract": 0.5, "train": 2.0},
               "clusters": {"image": {"nonempty": 8, "objective": 0.3}}, "broken": 0}
    assert wandb_values(episode) == {
        "episode/episode": 1, "episode/seconds/extract": 0.5, "episode/seconds/train": 2.0,
        "episode/clusters/image/nonempty": 8, "episode/clusters/image/objective": 0.3, "episode/broken": 0,
    }


def test_offline_wandb_mirrors_metrics_and_a_resumed_run_continues_it(synthetic_workspace, monkeypatch, tmp_path):
    from protoclip_cli.runs import RunDir
    from protoclip_cli.stages import train

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true",
                        "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    workspace = linked_workspace(synthetic_workspace, tmp_path / "ws")
    config = config_io.load(TrainConfig, RECIPE, OVERRIDES)
    run = RunDir(workspace.run_dir("wandb-run"))
    train.run(config, workspace, resume=False)
    first_lines = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    run_id = run.wandb_run_id()
    assert run_id and run.wandb_id_file.is_file()
    [first_file] = run.wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    got_id, history = offline_run(first_file)
    assert got_id == run_id
    started = offline_run_record(first_file)  # the recipe's project, entity and display name reach wandb
    assert (started.project, started.entity, started.display_name) == ("protoclip-tests", "vision-lab", "tiny run")
    recipe = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert recipe["name"] == "wandb-run" and recipe["proto"]["k"] == 8 and recipe["logging"]["wandb"] is True
    steps = [line for line in first_lines if line["kind"] == "step"]
    assert [line["step"] for line in steps] == list(range(1, 9)) and sorted(history) == list(range(1, 9))
    for line in steps:  # the same numbers at the same global step
        for key in ("total", "clip", "lr", "logit_scale"):
            assert history[line["step"]][key] == pytest.approx(line[key], rel=1e-6), (line["step"], key)
    assert "proto" in history[8] and "proto" not in history[4]  # prototype terms from episode 1 on
    episodes = [line for line in first_lines if line["kind"] == "episode"]
    assert [(e["episode"], e["step"]) for e in episodes] == [(0, 4), (1, 8)]
    for record in episodes:
        assert history[record["step"]]["episode/seconds/train"] == pytest.approx(record["seconds"]["train"])
    assert history[8]["episode/clusters/image/nonempty"] == episodes[1]["clusters"]["image"]["nonempty"]

    # As after a kill at step 7: the newest checkpoints are gone, the run resumes from step 6.
    for late in ("step-00000007.pt", "step-00000008.pt"):
        (run.checkpoints_dir / late).unlink(missing_ok=True)
    assert max(p.name for p in run.checkpoints_dir.glob("step-*.pt")) == "step-00000006.pt"
    train.run(config, workspace)
    assert run.wandb_run_id() == run_id  # the same wandb run
    files = sorted(run.wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2
    resumed_id, resumed = offline_run(next(f for f in files if f != first_file))
    assert resumed_id == run_id and sorted(resumed) == [7, 8]  # only what follows the checkpoint
    final = {line["step"]: line for line in map(json.loads, run.metrics_file.read_text().splitlines())
             if line["kind"] == "step"}
    assert sorted(final) == list(range(1, 9))
    for step in (7, 8):
        assert resumed[step]["total"] == pytest.approx(final[step]["total"], rel=1e-6)
        assert resumed[step]["total"] == pytest.approx(history[step]["total"], rel=1e-6)  # deterministic resume
    assert "episode/seconds/train" in resumed[8]

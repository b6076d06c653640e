"""Broken data does not stop training: an undecodable JPEG or a shard cut in half is skipped and
counted, the worker tops its batches up from its shards, and the planned steps all run."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from protoclip_cli.workspace import Workspace
from helpers import small_config


def _copy_dataset(source: Workspace, root: Path) -> Workspace:
    workspace = Workspace.at(root)
    shutil.copytree(source.dataset_dir("synthetic"), workspace.dataset_dir("synthetic"))
    return workspace


def corrupt_first_jpeg(shard: Path) -> int:
    """Overwrite the bytes of the shard's first image in place (the tar stays readable); its key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    with shard.open("r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x00" * member.size)
    return int(member.name.split(".")[0])


def _episodes(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "episode"]


@pytest.mark.parametrize("damage", ["jpeg", "truncated"])
def test_training_skips_counts_and_still_runs_every_planned_step(synthetic_workspace, tmp_path, damage):
    from protoclip_cli.stages.train import run

    torch.set_num_threads(2)
    workspace = _copy_dataset(synthetic_workspace, tmp_path / "ws")
    shards = workspace.shards("synthetic")
    if damage == "jpeg":
        corrupt_first_jpeg(shards[1])
    else:
        data = shards[1].read_bytes()
        shards[1].write_bytes(data[: len(data) // 2])
    # Episodes of the whole data set (4 shards): warm-up, then prototypes; every episode reads the damage.
    config = small_config("data.episode_size=0", "schedule.episodes=2", "schedule.lit_start_episode=99",
                          f"name='broken-{damage}'")
    manifest = run(config, workspace)
    planned = 2 * (512 // 32)
    assert manifest["global_step"] == manifest["total_steps"] == planned
    episodes = _episodes(workspace.run_dir(config.name))
    assert [e["steps"] for e in episodes] == [16, 16]
    if damage == "jpeg":
        # The warm-up trains on the broken sample's shard once; the prototype episode extracts it too.
        assert [e["broken"] for e in episodes] == [1, 2]
    else:
        # A cut tar loses its second half: the reader reports the damaged record; the lost samples
        # are never seen, so top-up rounds re-read the shard's first half.
        assert all(e["broken"] >= 1 for e in episodes)
    assert episodes[-1]["broken_total"] == sum(e["broken"] for e in episodes) == manifest["broken_samples"]

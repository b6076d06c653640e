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


def test_a_shard_cut_in_half_is_counted_in_samples_lost_and_named(synthetic_workspace, tmp_path):
    """A cut tar loses every sample after the cut, which no per-record count shows ('7 broken
    samples skipped' where 64 were lost): train counts the samples lost against the plan's count of
    the shard, names it, and says `download --verify` repairs it; three corrupt JPEGs elsewhere
    are still counted as broken."""
    from typer.testing import CliRunner

    from protoclip_cli.cli import app
    from helpers import RECIPE, SMALL

    workspace = _copy_dataset(synthetic_workspace, tmp_path / "ws")
    shards = workspace.shards("synthetic")
    for shard in (shards[0], shards[2], shards[3]):
        corrupt_first_jpeg(shard)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    sets = [*SMALL, "proto.teacher=''", "data.episode_size=0", "schedule.episodes=2", "schedule.lit_start_episode=99",
            "name='cut-shard'"]  # fmt: skip
    result = CliRunner().invoke(app, ["train", str(RECIPE), *(x for s in sets for x in ("--set", s)),
                                      "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    run_dir = workspace.run_dir("cut-shard")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    read, held = manifest["short_shards"]["00001.tar"]
    assert held == 128 and 0 < read < 100 and manifest["lost_samples"] == held - read
    assert list(manifest["short_shards"]) == ["00001.tar"]
    episodes = _episodes(run_dir)
    assert [e["lost"] for e in episodes] == [held - read] * 2  # the warm-up trains on it, episode 1 extracts it too
    assert all(e["short_shards"] == {"00001.tar": [read, held]} for e in episodes)
    assert manifest["global_step"] == manifest["total_steps"] == 32
    said = " ".join(result.output.split())
    assert f"{held - read} samples lost: shard 00001.tar ends after {read} of its 128 samples" in said
    assert (f"samples were lost to 1 shard(s) that end early (00001.tar after {read} of its 128) (metrics.jsonl counts "
            "them per episode); `protoclip download synthetic --verify` repairs the data set.") in said
    assert f"{held - read} samples were lost" in said

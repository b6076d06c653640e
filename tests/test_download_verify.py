"""`protoclip download NAME --verify`: every shard re-read as training reads it; broken shards
re-fetched where the URL list still serves them, broken samples dropped where it does not; the
manifest stays true (counts, shard list, what was dropped) and unchanged when nothing changed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from protoclip_cli.data import synthetic
from protoclip_cli.data.shard_verify import LOST, check_shard
from protoclip_cli.data.shards import iter_samples
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.data.shards import shard_sample_count
from protoclip_cli.workspace import Workspace
from test_train_broken import corrupt_first_jpeg  # the same damage train must survive

REPO = Path(__file__).resolve().parents[1]


def protoclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protoclip_cli", "download", *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def cut_before_sample(shard: Path, index: int) -> None:
    """Truncate ``shard`` inside the header of its ``index``-th sample's first record."""
    with tarfile.open(shard) as tar:
        keys = []
        for member in tar:
            key = member.name.split(".")[0]
            if key not in keys:
                keys.append(key)
                if len(keys) == index + 1:
                    offset = member.offset
                    break
    data = shard.read_bytes()
    shard.write_bytes(data[: offset + 100])


def samples(workspace: Workspace, name: str) -> dict[int, tuple[str, bytes]]:
    return {s.key: (s.caption, s.image) for s in iter_samples(workspace.shards(name), meta=False)}


@pytest.fixture
def copied(synthetic_workspace, tmp_path) -> Workspace:
    """The session's embedded data set, with the renderings its URL list points to."""
    workspace = Workspace.at(tmp_path / "ws")
    shutil.copytree(synthetic_workspace.dataset_dir("synthetic"), workspace.dataset_dir("synthetic"),
                    ignore=shutil.ignore_patterns("teacher"))
    shutil.copytree(synthetic_workspace.cache_dir("synthetic"), workspace.cache_dir("synthetic"))
    return workspace


def test_broken_shards_are_refetched_whole_and_the_manifest_is_unchanged(copied, synthetic_workspace):
    manifest_file = copied.dataset_dir("synthetic") / "manifest.json"
    before = manifest_file.read_bytes()
    shards = copied.shards("synthetic")
    broken_key = corrupt_first_jpeg(shards[1])
    cut_before_sample(shards[2], 40)
    found = check_shard(shards[1]), check_shard(shards[2])
    assert found[0].broken == {broken_key: "image does not decode (RuntimeError)"} and not found[0].damage
    assert found[1].damage and len(found[1].good) == 40 and len(found[1].lost) == 128 - 40

    result = protoclip("synthetic", "--verify", "--processes", "1", "-w", str(copied.root))
    assert result.returncode == 0, result.stderr
    table = " ".join(result.stdout.split())
    assert "Verified data set 'synthetic'" in table
    message = " ".join(result.stderr.split())
    assert "every broken shard was re-fetched whole" in message
    # The re-fetched shards hold exactly the samples of the original download.
    assert samples(copied, "synthetic") == samples(synthetic_workspace, "synthetic")
    assert all(check_shard(shard).ok for shard in copied.shards("synthetic"))
    assert manifest_file.read_bytes() == before  # same data, same version: teacher files stay valid

    again = protoclip("synthetic", "--verify", "--processes", "2", "-w", str(copied.root))
    assert again.returncode == 0, again.stderr
    assert "nothing to repair" in " ".join(again.stderr.split())
    assert manifest_file.read_bytes() == before


def _jpeg(index: int) -> bytes:
    return synthetic.jpeg_bytes(synthetic.render(synthetic.scene(index), 40))


def test_samples_the_source_no_longer_serves_are_dropped_and_recorded(tmp_path):
    sources = [tmp_path / "img" / f"{i}.jpg" for i in range(8)]
    sources[0].parent.mkdir()
    for i, path in enumerate(sources):
        path.write_bytes(_jpeg(i))
    url_list = tmp_path / "list.tsv"
    url_list.write_text("url\tcaption\n" + "".join(f"{p.as_uri()}\tcaption {i}\n" for i, p in enumerate(sources)))
    ws = tmp_path / "ws"
    common = ["--image-size", "32", "--samples-per-shard", "4", "--processes", "1", "--threads", "1", "-w", str(ws)]
    assert protoclip("web", "--url-list", str(url_list), *common).returncode == 0
    workspace = Workspace.at(ws)
    first, second = workspace.shards("web")

    broken_key = corrupt_first_jpeg(first)  # its source still serves it: re-fetched
    cut_before_sample(second, 2)  # samples 2 and 3 of the second shard are lost...
    for path in sources[5:]:
        path.unlink()  # ...and most of its links have died since: a re-fetch would give 1 sample, not 2
    lost = sorted(check_shard(second).lost)
    assert len(lost) == 2

    result = protoclip("web", "--verify", "--processes", "1", "--threads", "1", "-w", str(ws))
    assert result.returncode == 0, result.stderr
    assert "2 sample(s) could not be re-fetched and were dropped" in " ".join(result.stderr.split())
    manifest = workspace.dataset_manifest("web")
    train = manifest["splits"]["train"]
    assert (manifest["count_ok"], train["count_ok"], train["shards"]) == (6, 6, ["00000.tar", "00001.tar"])
    assert train["dropped"] == {"count": 2, "reasons": {LOST: 2}, "keys": lost}
    assert train["url_list"]["rows"] == 8  # what download recorded stays
    kept = samples(workspace, "web")
    assert broken_key in kept and not set(lost) & set(kept) and len(kept) == 6
    assert kept[broken_key][0] == "caption 0"
    assert [shard_sample_count(s) for s in workspace.shards("web")] == [4, 2]  # what training plans with
    assert all(check_shard(shard).ok for shard in workspace.shards("web"))
    assert not list(workspace.split_dir("web").glob(".*"))  # nothing set aside is left

    # The repair is a new version of the data set; a second verify finds nothing and keeps it.
    version = (workspace.dataset_dir("web") / "manifest.json").read_bytes()
    assert protoclip("web", "--verify", "--processes", "1", "-w", str(ws)).returncode == 0
    assert (workspace.dataset_dir("web") / "manifest.json").read_bytes() == version


def test_verify_takes_only_run_settings_and_needs_a_download(tmp_path):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["download", "web", "--verify", "--url-list", "x.tsv", "-w", str(tmp_path)])
    assert result.exit_code == 1
    assert "--verify reads the data set with the settings of its download, so --url-list does not apply" in \
        " ".join(result.output.split())
    result = runner.invoke(app, ["download", "web", "--verify", "-w", str(tmp_path)])
    assert result.exit_code == 1
    assert "Data set 'web' has no download-settings.json; download it with `protoclip download web` first." in \
        " ".join(result.output.split())


def test_training_on_shards_with_nothing_decodable_names_verify(synthetic_workspace, tmp_path):
    from helpers import small_config

    from protoclip_cli.stages.train import run

    workspace = Workspace.at(tmp_path / "ws")
    shutil.copytree(synthetic_workspace.dataset_dir("synthetic"), workspace.dataset_dir("synthetic"))
    for shard in workspace.shards("synthetic"):
        with tarfile.open(shard) as tar:
            images = [m for m in tar if m.name.endswith(".jpg")]
        with shard.open("r+b") as f:
            for member in images:
                f.seek(member.offset_data)
                f.write(b"\x00" * member.size)
    with pytest.raises(ProtoclipError, match=r"hold no decodable sample .* repair the data set with `protoclip "
                                             r"download synthetic --verify`"):
        run(small_config("name='t-undecodable'", "schedule.episodes=1", "proto.enabled=false", "model.heads=false"),
            workspace)


def test_the_end_of_a_run_counts_broken_samples_and_names_verify(synthetic_workspace, tmp_path):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    workspace = Workspace.at(tmp_path / "ws")
    shutil.copytree(synthetic_workspace.dataset_dir("synthetic"), workspace.dataset_dir("synthetic"))
    corrupt_first_jpeg(workspace.shards("synthetic")[2])
    overrides = ["name=t-broken-summary", "schedule.episodes=1", "proto.enabled=false", "model.heads=false",
                 "proto.teacher=''", "data.workers=0", "data.batch_size=32", "data.episode_size=0", "device='cpu'",
                 "model.projection_dim=32", "model.projection_hidden_dim=64"]  # fmt: skip
    result = CliRunner().invoke(app, ["train", str(REPO / "recipes" / "synthetic.toml"),
                                      *(x for o in overrides for x in ("--set", o)), "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert ("finished at step 16. Broken samples were skipped 1 time(s) (metrics.jsonl counts them per episode); "
            "`protoclip download synthetic --verify` repairs the data set.") in " ".join(result.output.split())

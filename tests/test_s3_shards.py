"""Shards on object storage: `protoclip download NAME --output s3://bucket/prefix` writes them there
through img2dataset and fsspec, and training, resume and evaluation read them there, the workspace
keeping the manifest and the small files (data/remote.py, data/downloader.py).

The object store is moto's S3 server on the loopback (``ThreadedMotoServer``), reached as any S3
endpoint is, through ``AWS_ENDPOINT_URL``; img2dataset's worker processes reach it the same way."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from helpers import cli, small_config
from protoclip_cli.configs.evaluate import EvaluateConfig
from protoclip_cli.core.checkpoint import load_checkpoint
from protoclip_cli.runs import RunDir
from protoclip_cli.stages import evaluate, train
from protoclip_cli.workspace import Workspace

pytestmark = pytest.mark.integration
BUCKET = "protoclip-test"
RECIPE = ("name='from-s3'", "data.episode_size=64", "data.batch_size=16", "schedule.episodes=2",
          "schedule.lit_start_episode=99", "logging.checkpoint_every_steps=1", "logging.keep_checkpoints=10")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A workspace whose embedded data set img2dataset wrote to s3://BUCKET/synthetic; yields (workspace, fs)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("AWS_ENDPOINT_URL", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                            ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1"),
                            ("PROTOCLIP_SHARD_RETRIES", "2"), ("PROTOCLIP_SHARD_RETRY_WAIT", "0.05")):
            patch.setenv(name, value)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        workspace = Workspace.at(tmp_path_factory.mktemp("s3") / "ws")
        result = cli("download", "synthetic", "--output", f"s3://{BUCKET}/synthetic", "--train-size", "128",
                     "--heldout-size", "64", "--samples-per-shard", "32", "--processes", "1",
                     "--workspace", str(workspace.root))
        assert result.exit_code == 0, result.output
        yield workspace, fs
    server.stop()


def test_the_shards_are_in_the_bucket_and_the_small_files_in_the_workspace(s3):
    workspace, fs = s3
    in_bucket = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/synthetic/shards"))
    assert [p for p in in_bucket if p.endswith(".tar")] == [f"{i:05d}.tar" for i in range(4)]
    assert not list(workspace.root.rglob("*.tar")) and not list(workspace.root.rglob("*_stats.json"))
    manifest = workspace.dataset_manifest("synthetic")
    assert manifest["splits"]["train"]["count_ok"] == 128 and manifest["config"]["output"] == f"s3://{BUCKET}/synthetic"
    assert workspace.shards("synthetic", "heldout")[0] == f"s3://{BUCKET}/synthetic/heldout/00000.tar"
    assert workspace.shard_counts("synthetic", "train") == {f"{i:05d}.tar": 32 for i in range(4)}
    assert (workspace.download_log("synthetic", "train")).is_file()
    # A rerun finds every shard in the bucket and keeps the manifest byte for byte.
    before = (workspace.dataset_dir("synthetic") / "manifest.json").read_bytes()
    again = cli("download", "synthetic", "--output", f"s3://{BUCKET}/synthetic", "--train-size", "128",
                "--heldout-size", "64", "--samples-per-shard", "32", "--processes", "1", "--workspace", str(workspace.root))
    assert again.exit_code == 0 and "every shard is already downloaded" in " ".join(again.output.split())
    assert (workspace.dataset_dir("synthetic") / "manifest.json").read_bytes() == before


def test_a_run_on_s3_shards_resumes_inside_an_episode_to_the_same_weights(s3, tmp_path):
    workspace, _ = s3
    config = small_config(*RECIPE)
    train.run(config, workspace)
    run = RunDir(workspace.run_dir("from-s3"))
    # The run as a kill after step 6 (inside episode 1) leaves it, in a workspace of its own.
    resumed = Workspace.at(tmp_path / "ws")
    shutil.copytree(workspace.dataset_dir("synthetic"), resumed.dataset_dir("synthetic"))
    shutil.copytree(run.path, resumed.run_dir("from-s3"))
    for checkpoint in RunDir(resumed.run_dir("from-s3")).checkpoints():
        if int(checkpoint.stem[5:]) > 6:
            checkpoint.unlink()
    train.run(config, resumed)
    final = load_checkpoint(RunDir(resumed.run_dir("from-s3")).latest_checkpoint())
    expected = load_checkpoint(run.latest_checkpoint())
    assert final.global_step == expected.global_step == 8
    assert all(torch.equal(final.model[name], expected.model[name]) for name in expected.model)

    metrics = evaluate.run(EvaluateConfig(task="zeroshot", model="from-s3", workers=1, plots=False, cache=False,
                                          out=str(tmp_path / "zeroshot.json")), workspace)
    assert next(iter(metrics["written"].values()))["images"] == 64


@pytest.mark.timeout(180)  # a hang fails here, not at the suite's 15 minutes
def test_a_missing_object_is_one_sentence(s3):
    workspace, fs = s3
    copy = f"{BUCKET}/synthetic/shards/00003.tar"
    fs.mv(copy, copy + ".away")
    try:
        result = cli("train", "synthetic", *[a for s in (*RECIPE[1:], "name='missing'", "proto.teacher=''", "device='cpu'")
                                             for a in ("--set", s)], "--workspace", str(workspace.root))
    finally:
        fs.mv(copy + ".away", copy)
    assert result.exit_code == 1
    sentence = " ".join(result.output.split())
    assert f"error: Shard s3://{copy} could not be read (no such file or object), 3 attempts in a row" in sentence
    assert json.loads((workspace.run_dir("missing") / "manifest.json").read_text())["status"] == "failed"

"""Workspace layout, name resolution, manifests and atomic writes."""

from __future__ import annotations

import json
import os
import time

import pytest

from protoclip_cli import artifacts
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.names import slugify
from protoclip_cli.workspace import Workspace


def make_dataset(workspace: Workspace, name: str, shards=("00000.tar",)):
    folder = workspace.dataset_dir(name)
    artifacts.write_manifest(folder, "download", splits={"train": {"shards": list(shards)}})
    return folder


def test_resolve_dataset_takes_only_or_latest_and_says_which(tmp_path, capsys):
    workspace = Workspace.at(tmp_path)
    with pytest.raises(MissingInputError, match="protoclip download synthetic"):
        workspace.resolve_dataset(None)
    make_dataset(workspace, "first")
    assert workspace.resolve_dataset(None) == "first"
    assert "the only one" in capsys.readouterr().err
    time.sleep(0.01)
    second = make_dataset(workspace, "second")
    os.utime(second / "manifest.json", (time.time() + 5, time.time() + 5))
    assert workspace.resolve_dataset(None) == "second"
    assert "the latest" in capsys.readouterr().err
    assert workspace.resolve_dataset("first") == "first"


def test_incomplete_dataset_is_not_listed(tmp_path):
    workspace = Workspace.at(tmp_path)
    workspace.dataset_dir("half").mkdir(parents=True)  # no manifest: a download that died
    assert workspace.datasets() == []
    with pytest.raises(MissingInputError, match="protoclip download half"):
        workspace.shards("half")


def test_shards_and_splits(tmp_path):
    workspace = Workspace.at(tmp_path)
    make_dataset(workspace, "d", shards=("00000.tar", "00001.tar"))
    assert workspace.shards("d") == [workspace.dataset_dir("d") / "shards" / s for s in ("00000.tar", "00001.tar")]
    with pytest.raises(ProtoclipError, match="has no split 'heldout' \\(it has: train\\)"):
        workspace.shards("d", "heldout")


def test_teacher_file_slug():
    assert slugify("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert slugify("/models/my model/") == "my-model"
    workspace = Workspace.at("/ws")
    assert str(workspace.teacher_file("cc3m", "all-mpnet-base-v2")).endswith(
        "datasets/cc3m/teacher/all-mpnet-base-v2.h5"
    )


def test_manifest_records_inputs_with_hashes(tmp_path):
    source = tmp_path / "source"
    artifacts.write_manifest(source, "download", {"a": 1}, count_ok=3)
    manifest = artifacts.write_manifest(tmp_path / "derived", "teacher-embed", inputs={"dataset": source})
    assert manifest["inputs"]["dataset"]["sha256"] == artifacts.file_sha256(source / "manifest.json")
    on_disk = json.loads((tmp_path / "derived" / "manifest.json").read_text())
    assert on_disk["stage"] == "teacher-embed" and on_disk["schema_version"] == artifacts.SCHEMA_VERSION
    assert artifacts.read_manifest(source)["count_ok"] == 3


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with artifacts.atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "folder"
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_read_manifest_names_the_command(tmp_path):
    with pytest.raises(MissingInputError, match="Run `protoclip download cc3m` first"):
        artifacts.read_manifest(tmp_path / "x", what="data set", command="protoclip download cc3m")

"""evaluate on a workspace it cannot write: with --out (and --no-cache) it writes only where it was
told; an unwritable feature cache is skipped with a warning; a file that is not an OpenCLIP
checkpoint is one sentence."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import linked_workspace


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def readonly_workspace(trained_run, synthetic_workspace, tmp_path):
    """A copy of the run in a workspace nothing can be written to: ``runs/<run>/eval`` is a regular
    file, so any write under it fails even for root, and without root every folder is also 0555."""
    workspace = linked_workspace(synthetic_workspace, tmp_path / "ro")
    run = workspace.run_dir(trained_run.name)
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "cluster", "export"))
    (run / "eval").write_text("not a folder")
    folders = [p for p in workspace.root.rglob("*") if p.is_dir() and not p.is_symlink()] + [workspace.root]
    if os.geteuid() != 0:
        for folder in folders:
            folder.chmod(0o555)
    yield workspace
    for folder in folders:
        folder.chmod(0o755)


def _evaluate(*args: str):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    return CliRunner().invoke(app, ["evaluate", *args, "--task", "synthetic-zeroshot", "--workers", "0", "--device", "cpu"])


def test_no_cache_and_out_elsewhere_work_on_a_read_only_workspace(readonly_workspace, tmp_path):
    from helpers import RUN

    before = _snapshot(readonly_workspace.root)
    out = tmp_path / "results" / "zeroshot.json"
    result = _evaluate(RUN, "--no-cache", "--out", str(out), "-w", str(readonly_workspace.root))
    assert result.exit_code == 0, result.output
    assert out.is_file() and '"top1"' in out.read_text()
    assert _snapshot(readonly_workspace.root) == before
    # Everything evaluate writes goes next to --out: the result, its plots, its CLIP_benchmark record.
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "clip_benchmark", "zeroshot-samples.png", "zeroshot-tsne.png", "zeroshot.json", "zeroshot.png"]
    assert [p.name for p in (out.parent / "clip_benchmark").iterdir()] == [
        "synthetic-heldout_eval-fixture@step-00000048.pt_protoclip-tiny_en_zeroshot_classification.json"]


def test_an_unwritable_feature_cache_is_skipped_with_a_warning(readonly_workspace, tmp_path):
    from helpers import RUN

    before = _snapshot(readonly_workspace.root)
    out = tmp_path / "zeroshot.json"
    result = _evaluate(RUN, "--out", str(out), "-w", str(readonly_workspace.root))
    assert result.exit_code == 0, result.output
    assert "The features are not cached (--no-cache skips the cache)." in " ".join(result.output.split())
    assert out.is_file() and _snapshot(readonly_workspace.root) == before


@pytest.mark.parametrize("content", [b"garbage\n", os.urandom(4096), b"PK\x05\x06" + bytes(18)])
def test_a_pretrained_file_that_is_no_checkpoint_is_one_sentence(tmp_path, content):
    bad = tmp_path / "BAD.pt"
    bad.write_bytes(content)
    result = _evaluate("--open-clip", "protoclip-tiny", "--pretrained", str(bad), "-w", str(tmp_path))
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert message.startswith(f"error: Could not load {bad} into protoclip-tiny (")
    assert message.endswith("use a checkpoint of that architecture.")
    assert "Traceback" not in result.output

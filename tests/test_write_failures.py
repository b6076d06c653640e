"""Writes that fail (a full disk, a file size limit, a file where a folder should be) are one
sentence naming the file, leave no temporary behind, and every artifact gets the mode the umask
gives a new file.

The failures are real: /dev/full answers every write with ENOSPC, RLIMIT_FSIZE makes the kernel
refuse a write past the limit (EFBIG) and a path under a regular file gives ENOTDIR; root cannot
bypass any of them, unlike a read-only permission bit."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from protoclip_cli import artifacts
from protoclip_cli.errors import WriteError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    previous = os.umask(0o022)
    yield set_mask
    os.umask(previous)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    written = artifacts.write_json(tmp_path / "a" / "result.json", {"x": 1})
    assert stat.S_IMODE(written.stat().st_mode) == file_mode
    with artifacts.atomic_dir(tmp_path / "report") as folder:
        (folder / "report.json").write_text("{}")
        (folder / "private").mkdir(mode=0o700)
        # As safetensors (export --format hf) and tempfile create theirs: 0600 whatever the umask.
        os.close(os.open(folder / "private" / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
    assert stat.S_IMODE((tmp_path / "report").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "report" / "report.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "report" / "private").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "report" / "private" / "weights.safetensors").stat().st_mode) == file_mode


def test_a_hub_folder_gets_the_modes_the_umask_gives(tmp_path, umask):
    """export --format hf: open_clip's safetensors writer creates the weights 0600 beside 0644 siblings."""
    import open_clip

    from protoclip_cli.core.hub_folder import write_hub_folder
    from protoclip_cli.core.model import register_tiny_configs

    umask(0o022)
    register_tiny_configs()
    with artifacts.atomic_dir(tmp_path / "tiny-hf") as folder:
        write_hub_folder(open_clip.create_model("protoclip-tiny"), "protoclip-tiny", folder, "a card")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "tiny-hf").iterdir()}
    assert modes == {"README.md": 0o644, "open_clip_config.json": 0o644, "open_clip_model.safetensors": 0o644}


def test_a_path_under_a_file_is_one_sentence(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"^Cannot write .*not-a-folder/out/result.json: a part of the path is a "
                                         r"file, not a folder; choose another path\.$"):
        artifacts.write_json(blocker / "out" / "result.json", {})
    with pytest.raises(WriteError, match="Cannot write .*not-a-folder/report: a file is in the way of a folder"):
        with artifacts.atomic_dir(blocker / "report"):
            pass


def test_a_full_disk_while_appending_metrics_is_one_sentence(tmp_path):
    from protoclip_cli.training.metrics import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    log.path.symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(WriteError, match=r"Cannot write .*metrics.jsonl: the disk is full; free some space"):
        log.write({"kind": "step", "step": 1})


def _limited(limit_bytes: int):
    def apply() -> None:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


@pytest.mark.integration  # starts processes
def test_a_checkpoint_that_does_not_fit_is_one_sentence_and_leaves_no_temporary(tmp_path):
    script = (
        "import torch\n"
        "from protoclip_cli.errors import WriteError\n"
        "from protoclip_cli.core.checkpoint import TrainState, save_checkpoint\n"
        "from protoclip_cli.runs import RunDir\n"
        "state = TrainState({'w': torch.zeros(200_000)}, {}, 0, 3, 3, 3, 3, 1, 0, {}, {})\n"
        "try:\n"
        f"    save_checkpoint(RunDir({str(tmp_path)!r}), state, 2)\n"
        "except WriteError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            preexec_fn=_limited(200_000), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"Cannot write {tmp_path}/checkpoints/step-00000003.pt: the file is larger than this system allows; "
        "raise the file size limit or choose another folder."
    )
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.integration  # starts processes
def test_torch_save_to_a_path_that_fails_is_a_write_error(tmp_path):
    """export and the evaluation cache hand torch.save a path: its failure names no errno."""
    script = (
        "import torch\n"
        "from protoclip_cli.artifacts import atomic_path\n"
        "from protoclip_cli.errors import WriteError\n"
        "try:\n"
        f"    with atomic_path({str(tmp_path / 'model.pt')!r}) as tmp:\n"
        "        torch.save({'w': torch.zeros(200_000)}, tmp)\n"
        "except WriteError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            preexec_fn=_limited(200_000), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.startswith(f"Cannot write {tmp_path}/model.pt: the write failed"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_turns_a_stray_os_error_into_one_sentence():
    import typer
    from typer.testing import CliRunner

    from protoclip_cli.cli.common import handle_errors

    def full() -> None:
        with open("/dev/full", "w") as f:
            f.write("x")

    app = typer.Typer()
    app.command()(handle_errors(full))
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1
    assert "the disk is full; free some space or choose another folder, then rerun." in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, target",
    [
        (["export", "--out", "{blocker}/model.pt"], "model.pt"),
        (["evaluate", "--task", "synthetic-zeroshot", "--no-cache", "--workers", "0", "--device", "cpu",
          "--out", "{blocker}/zeroshot.json"], "zeroshot.json"),
        (["cluster", "--tsne-points", "0", "--out", "{blocker}/report"], "report"),
    ],
)
def test_stages_that_cannot_write_their_output_say_so_in_one_sentence(trained_run, synthetic_workspace, tmp_path, args, target):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app
    from helpers import RUN

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    command = [args[0], RUN, *(a.format(blocker=blocker) for a in args[1:]), "-w", str(synthetic_workspace.root)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    assert f"error: Cannot write {blocker}/{target}: a file is in the way of a folder" in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.integration  # starts processes
def test_train_that_cannot_write_its_checkpoint_says_so_and_marks_the_run_failed(synthetic_workspace):
    from protoclip_cli.runs import RunDir

    run_dir = RunDir(synthetic_workspace.run_dir("t-full"))
    overrides = ["name=t-full", "schedule.episodes=1", "proto.enabled=false", "model.heads=false", "proto.teacher=''",
                 "data.workers=0", "data.batch_size=32", "data.episode_size=256", "device='cpu'"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "train", str(REPO / "recipes" / "synthetic.toml"),
         *(x for o in overrides for x in ("--set", o)), "-w", str(synthetic_workspace.root)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=_limited(2_000_000),  # the recipe, plan, manifest and metrics fit; a checkpoint does not
    )
    assert result.returncode == 1, result.stderr
    message = " ".join(result.stderr.split())
    assert (f"error: Cannot write {run_dir.checkpoints_dir}/step-00000008.pt: the file is larger than this system "
            "allows; raise the file size limit or choose another folder.") in message
    assert "Traceback" not in result.stderr
    assert json.loads(run_dir.manifest_file.read_text())["status"] == "failed"
    assert not any(run_dir.path.rglob("*.tmp")) and not run_dir.lock_file.exists()

"""One writer per run folder: a second `train` is refused naming the running process, a lock left
by a killed process is stale and taken over, readers (evaluate, cluster, export) keep working on a run
being trained, stale temporaries are cleaned on start, and Ctrl-C says where training stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protoclip_cli.configs import recipes
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.run_lock import RunLocked
from protoclip_cli.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
RECIPE = recipes.path("synthetic")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLD = (
    "import sys, time\n"
    "from protoclip_cli.runs import RunDir\n"
    "RunDir(sys.argv[1]).lock('train')\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def holder():
    """Start a process that holds a run's lock (as a running train does); kill it on exit."""
    started: list[subprocess.Popen] = []

    def hold(run_path: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_path)], stdout=subprocess.PIPE, text=True, env=ENV)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(holder, tmp_path, capsys):
    run = RunDir(tmp_path / "runs" / "busy")
    first = holder(run.path)
    record = json.loads(run.lock_file.read_text())
    assert record["pid"] == first.pid and record["host"] == socket.gethostname() and record["command"] == "train"
    assert run.writer()["pid"] == first.pid

    with pytest.raises(RunLocked, match=rf"^Run 'busy' is being written by process {first.pid} on "
                                        rf"{socket.gethostname()} since .*; wait for it to end or stop it, or use "
                                        r"another run name with --set name=NEW_NAME \(if that process is gone, delete "):
        run.lock()

    first.kill()  # kill -9: the process cannot remove its lock file
    first.wait()
    assert json.loads(run.lock_file.read_text())["pid"] == first.pid
    assert run.writer() is None  # the file is there, but nobody holds its lock: stale
    with run.lock() as lock:
        assert f"left locked by process {first.pid}" in capsys.readouterr().err
        assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
        assert lock.fd is not None
    assert not run.lock_file.exists()


HOLD_WITH_CHILD = (
    "import os, sys, time\n"
    "from protoclip_cli.runs import RunDir\n"
    "RunDir(sys.argv[1]).lock('train')\n"
    "child = os.fork()\n"  # as a data-loader worker: it inherits the lock
    "if child == 0:\n"
    "    time.sleep(600)\n"
    "    os._exit(0)\n"
    "print(child, flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_lock_kept_only_by_a_killed_writers_children_is_taken_over(tmp_path, capsys):
    """kill -9 of train leaves its data-loader workers alive for a moment, holding the inherited
    lock; the rerun must not be refused because of them."""
    run = RunDir(tmp_path / "runs" / "orphans")
    writer = subprocess.Popen([sys.executable, "-c", HOLD_WITH_CHILD, str(run.path)], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    child = int(writer.stdout.readline())
    try:
        writer.kill()
        writer.wait()
        os.kill(child, 0)  # the child still runs and still holds the lock
        assert run.writer() is None
        with run.lock():
            assert f"left locked by process {writer.pid}" in capsys.readouterr().err
            assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
            with pytest.raises(RunLocked):  # and the new lock excludes others
                RunDir(run.path).lock()
    finally:
        os.kill(child, signal.SIGKILL)


def test_train_refuses_a_run_another_process_writes_and_touches_nothing(holder, synthetic_workspace):
    from helpers import small_config

    from protoclip_cli.stages.train import run

    run_dir = RunDir(synthetic_workspace.run_dir("t-locked"))
    other = holder(run_dir.path)
    with pytest.raises(ProtoclipError, match=rf"Run 't-locked' is being written by process {other.pid}"):
        run(small_config("name='t-locked'"), synthetic_workspace)
    assert [p.name for p in run_dir.path.iterdir()] == ["train.lock"]


def test_train_removes_stale_temporaries_when_it_starts(synthetic_workspace):
    """The cleanup happens as soon as the lock is held, before the plan is even checked: a run
    refused for its batch size (so that no training time is spent) has cleaned up already."""
    from helpers import small_config

    from protoclip_cli.stages.train import run

    run_dir = RunDir(synthetic_workspace.run_dir("t-stale"))
    stale = [run_dir.checkpoints_dir / ".step-00000004.pt.k2j3.tmp", run_dir.path / ".manifest.json.x8.tmp",
             run_dir.episode_dir(1) / ".prototypes.h5.a1.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    (run_dir.path / ".cluster.tmp").mkdir()  # a folder built by atomic_dir
    kept = run_dir.path / "notes.txt"
    kept.write_text("not a temporary")
    with pytest.raises(ProtoclipError, match="gives no full batch of 512"):
        run(small_config("name='t-stale'", "data.batch_size=512"), synthetic_workspace)
    assert not any(run_dir.path.rglob("*.tmp")) and kept.is_file()
    assert not run_dir.lock_file.exists()  # released on the way out


def test_evaluate_cluster_and_export_read_a_run_that_is_being_trained(holder, trained_run, synthetic_workspace, tmp_path):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    other = holder(trained_run)
    workspace = ["-w", str(synthetic_workspace.root)]
    exported = tmp_path / "running.pt"
    for command in (["evaluate", trained_run.name, "--task", "synthetic-zeroshot", "--workers", "0", "--device", "cpu"],
                    ["cluster", trained_run.name, "--tsne-points", "0"],
                    ["export", trained_run.name, "--format", "open_clip", "--out", str(exported)]):
        result = CliRunner().invoke(app, [*command, *workspace])
        assert result.exit_code == 0, result.output
        assert f"is being trained now (process {other.pid}" in " ".join(result.output.split())
    assert exported.is_file() and exported.stat().st_size > 0
    assert RunDir(trained_run).writer()["pid"] == other.pid


def test_ctrl_c_exits_130_saying_where_training_stopped(synthetic_workspace):
    name = "t-ctrl-c"
    run_dir = RunDir(synthetic_workspace.run_dir(name))
    args = ["--set", f"name={name}", "--set", "data.workers=1", "--set", "data.batch_size=32",
            "--set", "data.episode_size=256", "--set", "schedule.episodes=40", "--set", "proto.enabled=false",
            "--set", "model.heads=false", "--set", "proto.teacher=''", "--set", "logging.checkpoint_every_steps=2",
            "--set", "device='cpu'", "--set", "data.augmentation='rrc'"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "protoclip_cli", "train", str(RECIPE), *args, "-w", str(synthetic_workspace.root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while run_dir.latest_checkpoint() is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    sentence = " ".join(stderr.split())
    checkpoint = run_dir.latest_checkpoint()
    step = int(checkpoint.stem.split("-")[1])
    assert "Training stopped by Ctrl-C at step " in sentence
    assert f"rerunning the same command resumes from {checkpoint.name} (step {step})." in sentence
    assert "Traceback" not in stderr
    manifest = json.loads(run_dir.manifest_file.read_text())
    assert manifest["status"] == "interrupted" and manifest["last_checkpoint"] == str(checkpoint)
    assert not run_dir.lock_file.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Python drops it: the point
def test_a_ctrl_c_that_a_finaliser_swallowed_still_stops_training_at_its_next_step():
    """A KeyboardInterrupt raised inside ``__del__`` (or a generator's close) is printed and dropped
    by Python; the signal was recorded, and the trainer's next step boundary stops on it."""
    import gc

    from protoclip_cli.training.interrupts import catching_stop_signals, stop_requested

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between these bytecodes, inside __del__
                pass

    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job
    with catching_stop_signals():
        assert stop_requested() is None  # nothing received yet
        finalised = Finalised()
        del finalised
        gc.collect()
        assert stop_requested() == signal.SIGINT
    assert stop_requested() is None  # the record ends with the block
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back

"""protoclip as a user installs it: the wheel (not an editable checkout) in a fresh virtual
environment, run from a folder outside the checkout; its metadata builds without a warning of ours;
and `protoclip demo` from an empty workspace prints no traceback and fits 80 columns."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import REPO, write_tiny_dataset

pytestmark = pytest.mark.integration  # builds a wheel and runs the commands as processes


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without the test run's PYTHONPATH, so only what is installed is imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=600, env=_clean_env())
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (found,) = out.glob("protoclip-*.whl")
    return found, build.stdout + build.stderr


def test_the_metadata_builds_without_a_deprecation_warning(wheel):
    _, output = wheel
    assert "deprecat" not in output.lower(), output[-3000:]


def test_the_installed_wheel_finds_its_recipes_and_trains_from_any_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel[0])],
                               capture_output=True, text=True, timeout=300, env=_clean_env())
    assert installed.returncode == 0, installed.stderr[-2000:]
    # The dependencies come from this environment's site-packages, after the wheel's own.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    protoclip = str(venv / "bin" / "protoclip")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], cwd=elsewhere, capture_output=True, text=True, timeout=600, env=_clean_env())

    where = run(str(python), "-c", "import protoclip_cli; print(protoclip_cli.__file__)")
    assert where.stdout.strip().startswith(purelib), where.stdout + where.stderr
    listed = run(protoclip, "recipes")
    assert listed.returncode == 0 and "synthetic-clip" in listed.stdout, listed.stderr
    assert run(protoclip, "demo", "--help").returncode == 0
    assert run(protoclip, "compare", "--help").returncode == 0
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(tmp_path / "ws")
    write_tiny_dataset(workspace)
    trained = run(protoclip, "train", "synthetic", "--workspace", str(workspace.root), "--set", "name='from-wheel'",
                  "--set", "schedule.episodes=1", "--set", "data.episode_size=128", "--set", "proto.teacher=''",
                  "--set", "data.workers=0", "--set", "proto.k=8", "--set", "logging.checkpoint_every_steps=0")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (workspace.run_dir("from-wheel") / "checkpoints" / "step-00000002.pt").is_file()


def test_a_small_demo_from_an_empty_workspace_prints_no_traceback_and_fits_80_columns(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "demo", "--workspace", str(tmp_path / "ws"), "--train-size", "512",
         "--heldout-size", "256", "--set", "data.episode_size=128", "--set", "schedule.episodes=3",
         "--set", "proto.k=8", "--set", "proto.teacher_k=8"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_clean_env(COLUMNS="80", PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stray in ("Traceback", "Exception ignored", "Warning:", "warnings.warn"):
        assert stray not in result.stderr and stray not in result.stdout, (stray, result.stderr[-3000:])
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    table = result.stdout[result.stdout.index("Held-out results"):]
    assert "zero-shot top-1 %" in table and "ProtoCLIP" in table and "CLIP" in table and "difference" in table
    assert "chance: 2.8% top-1 (36 classes)" in " ".join(result.stdout.split()).lower()
    assert "docs/results.md" in result.stdout and "protoclip download NAME" in " ".join(result.stdout.split())

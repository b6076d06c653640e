"""The command line: help is fast (no torch at start-up), every stage is registered."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["download", "teacher-embed", "train", "cluster", "evaluate", "export", "demo"]

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
def test_help_does_not_import_heavy_libraries(args):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout
    assert "Usage" in proc.stdout


def test_top_level_help_lists_every_stage():
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    output = CliRunner().invoke(app, ["--help"]).output
    for command in COMMANDS:
        assert command in output


def test_console_script_reports_errors_with_exit_1(tmp_path):
    """A ProtoclipError becomes one sentence on stderr and exit status 1, with no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "train", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "missing.toml does not exist" in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr

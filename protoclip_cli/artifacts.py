"""Artifacts on disk: atomic writes and the ``manifest.json`` every artifact folder carries.

A crash must never leave a half-written file where a later stage would trust it, so every file is
written to a temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from protoclip_cli import __version__
from protoclip_cli.errors import MissingInputError, ProtoclipError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: built under a temporary name, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    folder: str | Path,
    stage: str,
    config: dict[str, Any] | None = None,
    inputs: dict[str, str | Path] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Write ``folder/manifest.json``: stage, schema version, config, inputs (with their manifests'
    hashes), package version, creation time, plus the stage's own ``fields``."""
    folder = Path(folder)
    recorded_inputs = {}
    for name, input_path in (inputs or {}).items():
        input_path = Path(input_path)
        manifest = input_path / MANIFEST if input_path.is_dir() else input_path
        recorded_inputs[name] = {
            "path": str(input_path),
            "sha256": file_sha256(manifest) if manifest.is_file() else None,
        }
    manifest = {
        "stage": stage,
        "schema_version": SCHEMA_VERSION,
        "protoclip_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config or {},
        "inputs": recorded_inputs,
        **fields,
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path, *, what: str = "artifact", command: str | None = None) -> dict[str, Any]:
    """Read ``folder/manifest.json``; if it is missing, raise an error naming ``command``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        hint = f" Run `{command}` first." if command else ""
        raise MissingInputError(f"No {what} at {Path(folder)} (its manifest.json is missing).{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProtoclipError(f"{path} is not valid JSON ({exc}); remove the folder and rerun its stage.") from exc


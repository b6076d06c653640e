"""Artifacts on disk: atomic writes and the ``manifest.json`` every artifact folder carries.

A crash must never leave a half-written file where a later stage would trust it, so every file is
written to a temporary name in the same folder and renamed into place, with the mode the umask
gives a new file. A write that fails (full disk, read-only folder) is a one-sentence WriteError.
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
from protoclip_cli.errors import WRITE_ERRNOS, MissingInputError, ProtoclipError, os_error_cause, write_error

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def _umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (``os.umask``
    sets it for a moment, which a thread creating a file at that instant would see)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_write_failure(exc: BaseException) -> bool:
    cause = os_error_cause(exc)
    if cause is not None:
        return cause.errno in WRITE_ERRNOS
    # torch.save to a path reports a failed write only as its C++ writer's assertion.
    return isinstance(exc, RuntimeError) and "inline_container" in str(exc)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The file gets the mode a plain ``open()`` would give it (0666 less the umask: temporary files
    are created 0600). A write that fails for a reason the user can fix (full disk, read-only
    folder, a file where a folder should be) is a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, ProtoclipError) and _is_write_failure(exc):
            raise write_error(path, exc) from exc
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: built under a temporary name, renamed when complete,
    with the folder and everything in it given the modes the umask gives (whatever their writers chose)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield tmp
        _umask_modes(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, ProtoclipError) and _is_write_failure(exc):
            raise write_error(path, exc) from exc
        raise


def _umask_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives a new file or folder: some
    writers create theirs 0600 (safetensors), and a shared folder must not hold one unreadable file."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                executable = os.stat(file).st_mode & 0o111
                os.chmod(file, (0o777 if executable else 0o666) & ~mask)


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
    file_name: str = MANIFEST,
    **fields: Any,
) -> dict[str, Any]:
    """Write ``folder/manifest.json`` (or ``folder/<file_name>``): stage, schema version, config,
    inputs (with their manifests' hashes), package version, creation time, plus the stage's own
    ``fields``."""
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
    write_json(folder / file_name, manifest)
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


"""The one-writer lock of a run folder: a second ``train`` of the same run is refused, naming the
process that writes it; a lock left by a process that died is detected and taken over."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from protoclip_cli.console import info
from protoclip_cli.errors import ProtoclipError, write_error


class RunLocked(ProtoclipError):
    """Another live process writes the run."""


class RunLock:
    """The one-writer lock of a run folder (``RunDir.lock_file``: ``runs/<run>/train.lock``).

    Exclusion is an OS lock (``flock``) on the file, held as long as the process lives: the kernel
    drops it when the process ends, even by ``kill -9`` or a crash, so a lock file whose lock
    nobody holds is stale and is taken over. Forked children (data-loader workers) inherit the lock,
    so a lock still held after its recorded writer of this host has died is held by orphans that
    write nothing: it is stale too, and replaced by a fresh file. The file's contents (pid, host, command, start time)
    name the holder in the refusal. Where the file system has no locks (some network mounts), the
    pid is checked instead: a lock of this host whose process is gone is stale; one of another host
    is honoured until its file is removed by hand.
    """

    def __init__(self, path: Path, run_name: str):
        self.path = Path(path)
        self.run_name = run_name
        self.fd: int | None = None

    def acquire(self, command: str) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            orphaned: dict[str, Any] = {}
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                if not self._try_lock(fd):
                    holder = _read_holder(fd)
                    os.close(fd)
                    if _orphaned(holder):  # held only by children of a dead writer: a fresh file
                        orphaned = holder
                        self.path.unlink(missing_ok=True)
                        continue
                    raise RunLocked(self._refusal(holder))
                # A holder that finished between our open and our lock removed the file it locked:
                # ours is then an orphan, so start again on the path's current file.
                try:
                    current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    break
                os.close(fd)
            stale = _read_holder(fd) or orphaned
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                      "argv": " ".join(sys.argv), "started_at": _now()}  # fmt: skip
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record, sort_keys=True) + "\n").encode(), 0)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        self.fd = fd
        if stale:
            info(f"Run {self.path.parent} was left locked by process {stale.get('pid')} on {stale.get('host')}, "
                 "which has ended; taking the lock over.")
        return self

    def _try_lock(self, fd: int) -> bool:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # no locks on this file system: judge by the recorded process
            return not _alive(_read_holder(fd))

    def _refusal(self, holder: dict[str, Any]) -> str:
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        since = f" since {holder['started_at']}" if holder.get("started_at") else ""
        return (
            f"Run '{self.run_name}' is being written by process {pid} on {host}{since} "
            f"(`{holder.get('argv') or holder.get('command', '?')}`); wait for it to end or stop it, or use another "
            f"run name with --set name=NEW_NAME (if that process is gone, delete {self.path})."
        )

    def holder(self) -> dict[str, Any] | None:
        """The live holder's record, or None (no lock file, or a stale one)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                return None if _orphaned(holder) else (holder or {})
            except OSError:
                holder = _read_holder(fd)
                return holder if _alive(holder) else None
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        # Removed while still locked: a waiting process then finds no file, or a new one (see acquire).
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the recorded holder may still run: another host's process cannot be checked."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(holder.get("pid", 0)) > 0


def _orphaned(holder: dict[str, Any]) -> bool:
    """A busy lock whose recorded writer, on this host, has ended: forked children (data-loader
    workers) inherit the lock and keep it for a few seconds after their parent is killed, but they
    write nothing to the run."""
    return bool(holder) and holder.get("host") == socket.gethostname() and not _alive(holder)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

"""The exception types a stage raises for problems a user can fix; the CLI turns each into one
sentence on stderr and its exit status (1; 130 after Ctrl-C; train's stop signals have their own)."""

from __future__ import annotations

import errno
import os


class ProtoclipError(Exception):
    """A problem the user can fix. The message is a sentence saying what is wrong and what to do."""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        # Raised in a data-loader worker, it reaches the main process rebuilt from torch's text of its
        # traceback ("Caught ... in DataLoader worker process 0.\nOriginal Traceback ..."), whose last
        # line is "<module>.<class>: <sentence>": keep the sentence.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") and "\nOriginal Traceback" in args[0]:
            last = args[0].rstrip().splitlines()[-1]
            args = (last.split(": ", 1)[1] if ": " in last else last,)
        super().__init__(*args)


class MissingInputError(ProtoclipError):
    """An artifact a stage needs is not in the workspace; the message names the command that makes it."""


class Refused(ProtoclipError):
    """A stage refused to start (its inputs, its run folder, the checkpoint it would resume from):
    nothing was done. Under torchrun every rank refuses alike, so the command line says it once."""


class WriteError(ProtoclipError):
    """A file could not be written (full disk, read-only folder, a file where a folder should be)."""


class Interrupted(ProtoclipError):
    """The user stopped the command (Ctrl-C, or a signal such as SIGTERM); the message says where it
    stopped and how to continue. ``exit_code``: 130 after Ctrl-C, the signal's own otherwise."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


# errno -> (what went wrong, what to do), for the failures a user can cause or fix.
_ADVICE = {
    errno.ENOSPC: ("the disk is full", "free some space or choose another folder, then rerun"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another folder, then rerun"),
    errno.EFBIG: ("the file is larger than this system allows", "raise the file size limit or choose another folder"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder (--workspace or --out)"),
    errno.EACCES: ("permission is denied", "choose a folder you can write to (--workspace or --out)"),
    errno.EPERM: ("the operation is not permitted", "choose a folder you can write to (--workspace or --out)"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
    errno.EEXIST: ("a file is in the way of a folder", "remove it or choose another path"),
    errno.EISDIR: ("it is a folder", "name a file instead"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("the device reported an input/output error", "check the disk, then rerun"),
}
WRITE_ERRNOS = frozenset(_ADVICE)


def os_error_cause(exc: BaseException) -> OSError | None:
    """The OSError with an errno in ``exc`` or the exceptions it was raised from (torch.save and
    h5py wrap the OSError of a failed write in their own errors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: os.PathLike | str, exc: BaseException) -> WriteError:
    """One sentence for a failed write of ``path``: what the system said and what to do."""
    cause = os_error_cause(exc)
    if cause is not None and cause.errno in _ADVICE:
        what, advice = _ADVICE[cause.errno]
    else:
        what = f"the write failed ({os.strerror(cause.errno) if cause is not None else type(exc).__name__})"
        advice = "check free space and permissions, then rerun"
    return WriteError(f"Cannot write {path}: {what}; {advice}.")


def os_error_sentence(exc: OSError) -> str:
    """One sentence for an OSError that reached the command line outside an atomic write."""
    path = exc.filename if exc.filename is not None else "a file"
    if exc.errno in _ADVICE:
        what, advice = _ADVICE[exc.errno]
        return f"{path}: {what}; {advice}."
    reason = exc.strerror or type(exc).__name__
    return f"{path}: {reason}; check the path, free space and permissions, then rerun."

"""The identity of evaluation inputs on disk (data sets and model weights), for the feature cache.

A file is known by its resolved path, size and modification time: a file replaced in place or
written again by a new download gets a new identity, so the cache never serves stale features,
and no file is read (hashing the contents would cost as much as the extraction the cache saves).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable


def fingerprint(files: Iterable[str | Path] = (), *identity: object) -> str:
    """sha256 (hex) of ``files`` in order (resolved path, size, modification time) and then of
    ``identity``: what else tells the data apart (a split, a row count, tar-member offsets)."""
    lines = []
    for file in files:
        path = Path(file)
        stat = path.stat()
        lines.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    lines += map(str, identity)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()

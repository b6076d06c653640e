"""Names of data sets, runs and teacher slugs: they become folder and file names in the workspace.

One path component of portable characters, so a name can neither leave the workspace (``../x``)
nor nest folders (``a/b``), and it survives shells, URLs and other file systems. Configs check the
names they hold with :func:`is_valid_name` (naming the option to change), and
:class:`~protoclip_cli.workspace.Workspace` checks them again with :func:`check_name`.
"""

from __future__ import annotations

import re

from protoclip_cli.errors import ProtoclipError

NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def is_valid_name(name: str) -> bool:
    """True for a name that is one safe path component (see :data:`NAME_RULE`)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def name_error(what: str, name: str, setting: str) -> str:
    """The one sentence refusing ``name`` as ``what`` (e.g. 'run name'), naming the ``setting`` to change."""
    return f"{what} {name!r} is not a valid name: use {NAME_RULE} (one folder name, no '/'), e.g. {setting}."


def check_name(name: str, what: str, setting: str) -> str:
    if not is_valid_name(name):
        raise ProtoclipError(name_error(what, name, setting))
    return name


def slugify(name: str) -> str:
    """A file-name-safe slug, always a valid name: 'sentence-transformers/all-MiniLM-L6-v2' -> 'all-MiniLM-L6-v2'."""
    base = name.rstrip("/").split("/")[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip("-._")[:100].rstrip("-.")
    return slug if is_valid_name(slug) else "model"

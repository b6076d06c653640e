"""Class folders, ``ROOT/<class>/<images>``: any ImageFolder, ImageNet's wnid folders, the
reference's test folders and Country211's. One scan reads them all; :func:`folder_classes` matches
folder names to a data set's class list where the folders are not the classes themselves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.data.images import IMAGE_EXTENSIONS


def scan(root: Path, layout_hint: str) -> tuple[list[str], list[Path], np.ndarray]:
    """(sorted class folder names, image paths, index of each path's folder) of ``root``; an error
    ending in ``layout_hint`` (what the layout should be) when it holds no class folders of images."""
    if not root.is_dir():
        raise MissingInputError(f"Folder {root} does not exist; {layout_hint}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(folders):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not folders or not paths:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        found = f"it holds {len(loose)} loose images and no class folders" if loose else "it holds no images in class folders"
        raise ProtoclipError(f"{root} is not an ImageFolder ({found}); {layout_hint}")
    return folders, paths, np.asarray(labels, dtype=np.int64)


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def folder_classes(folders: Sequence[str], classnames: Sequence[str]) -> list[int]:
    """The class index of each class folder: by name (``Apply_Eye_Makeup``, ``ApplyEyeMakeup`` for
    'Apply Eye Makeup'), by number (0-based when a folder 0 exists, else 1-based), or, with one
    folder per class, by sorted folder order (Country211's ISO codes)."""
    index = {_normalised(c): i for i, c in enumerate(classnames)}
    if all(_normalised(f) in index for f in folders):
        return [index[_normalised(f)] for f in folders]
    if all(f.isdigit() for f in folders):
        base = 0 if any(int(f) == 0 for f in folders) else 1
        found = [int(f) - base for f in folders]
        if all(0 <= i < len(classnames) for i in found):
            return found
    if len(folders) == len(classnames):
        return list(range(len(classnames)))
    raise ProtoclipError(
        f"Cannot match {len(folders)} class folders (e.g. '{folders[0]}') to the {len(classnames)} classes; name them "
        "after the classes, number them, or keep one folder per class."
    )

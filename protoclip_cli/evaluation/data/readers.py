"""Evaluation data sources, each turned into an :class:`ImageSet` (images, and labels or captions).

Layouts (see docs/evaluation.md): an ImageFolder ``ROOT/<class>/<image>``; ImageNet
``ROOT/{train,val}/<wnid>/``; torchvision CIFAR-10/100 and STL-10 already on disk under ``ROOT``;
COCO ``ROOT/val2017/`` with ``captions_val2017.json``; Flickr30k images with the Karpathy split
file; webdataset shards of image-text pairs; the workspace's embedded data set (shards written by
``protoclip download``, ground truth in its manifest).
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from protoclip_cli.data.shards import iter_samples
from protoclip_cli.data.transforms import decode_image
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.data import imagenet as meta
from protoclip_cli.evaluation.data.prompts import CLASSNAMES, TEMPLATES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TORCHVISION_SETS = ("cifar10", "cifar100", "stl10")


@dataclass
class ImageSet:
    """Images to extract features from, with what the tasks compare them to.

    ``images(transform)`` returns a torch data set yielding ``(row, uint8 (3, H, W))``: a
    map-style one for files and arrays, an iterable one for shards (rows come from sample keys).
    ``captions[i]`` lists the captions of image ``i`` (retrieval); ``labels[i]`` indexes
    ``classnames`` (classification and clustering).
    """

    name: str
    fingerprint: str
    size: int
    images: Callable[[Callable], Dataset]
    labels: np.ndarray | None = None
    classnames: list[str] | None = None
    templates: list | None = None
    captions: list[list[str]] | None = None
    keys: np.ndarray | None = None  # sample keys of shard sources, row order
    details: dict = field(default_factory=dict)

    def caption_owners(self) -> tuple[list[str], torch.Tensor]:
        """(flat list of captions, index of each caption's image)."""
        if self.captions is None:
            raise ProtoclipError(f"Data set {self.name} has no captions; retrieval needs image-text pairs.")
        texts = [c for per_image in self.captions for c in per_image]
        owners = torch.tensor([i for i, per_image in enumerate(self.captions) for _ in per_image], dtype=torch.long)
        return texts, owners


def _hash(*parts: object) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()


def _files_fingerprint(paths: Sequence[Path]) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return _hash(*stats)


def read_file_image(path: Path) -> torch.Tensor:
    try:
        return decode_image(path.read_bytes())
    except RuntimeError as error:
        raise ProtoclipError(f"Could not decode image {path} ({error}); remove or replace the file.") from error


class _FileImages(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        return row, self.transform(read_file_image(self.paths[row]))


class _ArrayImages(Dataset):
    """uint8 images held in memory, (N, H, W, 3) or (N, 3, H, W)."""

    def __init__(self, array: np.ndarray, channels_first: bool, transform: Callable) -> None:
        self.array, self.channels_first, self.transform = array, channels_first, transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(self.array[row]))
        return row, self.transform(image if self.channels_first else image.permute(2, 0, 1))


class _ShardImages(IterableDataset):
    """Images of webdataset shards; each data-loader worker streams its own shards."""

    def __init__(self, shards: Sequence[Path], rows: dict[int, int], transform: Callable) -> None:
        self.shards, self.rows, self.transform = list(shards), rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        if not shards:
            return
        for sample in iter_samples(shards, images=True, meta=False):
            if sample.key in self.rows and sample.image is not None:
                yield self.rows[sample.key], self.transform(decode_image(sample.image))


# -- class names and templates ---------------------------------------------------------------------


def read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"The {what} file {path} does not exist; pass a text file with one entry per line.")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ProtoclipError(f"The {what} file {path} is empty; write one entry per line.")
    return lines


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with a ``{}`` where the class name goes."""
    templates = read_lines(path, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ProtoclipError(f"Template '{bad[0]}' in {path} has no '{{}}' for the class name; add one.")
    return templates


def read_classnames(path: str | Path, folders: Sequence[str]) -> list[str]:
    """Class names for ``folders`` (sorted class folders): one per line in folder order, or
    ``folder<TAB>name`` lines in any order."""
    lines = read_lines(path, "class-names")
    if all("\t" in line for line in lines):
        mapping = dict(line.split("\t", 1) for line in lines)
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ProtoclipError(f"Class-names file {path} has no line for folder '{missing[0]}'.")
        return [mapping[f].strip() for f in folders]
    if len(lines) != len(folders):
        raise ProtoclipError(
            f"Class-names file {path} has {len(lines)} names but there are {len(folders)} class folders; "
            "write one name per folder, in sorted folder order."
        )
    return lines


# -- sources -------------------------------------------------------------------------------------


def _class_folders(root: Path, layout_hint: str) -> tuple[list[str], list[Path], np.ndarray]:
    """(sorted class folder names, image paths, label per path) of an ImageFolder layout."""
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


FOLDER_LAYOUT = "expected ROOT/<class>/<image files> with one folder per class."


def image_folder(root: str | Path, classnames_file: str | Path | None, name: str | None = None) -> ImageSet:
    """Any ImageFolder; class names from ``classnames_file`` (else the folder names)."""
    root = Path(root)
    folders, paths, labels = _class_folders(root, FOLDER_LAYOUT)
    classnames = read_classnames(classnames_file, folders) if classnames_file else [f.replace("_", " ") for f in folders]
    return ImageSet(
        name=name or root.name,
        fingerprint=_files_fingerprint(paths),
        size=len(paths),
        images=lambda transform: _FileImages(paths, transform),
        labels=labels,
        classnames=classnames,
        details={"root": str(root), "classes": len(folders)},
    )


def imagenet(root: str | Path, split: str = "val") -> ImageSet:
    """ImageNet-1k ``ROOT/<split>/<wnid>/*.JPEG``: labels are ImageNet-1k indices, names open_clip's."""
    folder = Path(root) / split
    hint = f"expected {Path(root)}/{split}/<wnid>/*.JPEG (e.g. {split}/n01440764/) as in the ImageNet-1k {split} set."
    folders, paths, folder_labels = _class_folders(folder, hint)
    index = meta.class_index_of(folders)
    labels = np.asarray([index[folders[label]] for label in folder_labels], dtype=np.int64)
    return ImageSet(
        name=f"imagenet-{split}",
        fingerprint=_files_fingerprint(paths),
        size=len(paths),
        images=lambda transform: _FileImages(paths, transform),
        labels=labels,
        classnames=meta.classnames(),
        templates=meta.templates(),
        details={"root": str(folder), "class_folders": len(folders)},
    )


def torchvision_set(name: str, root: str | Path, train: bool) -> ImageSet:
    """CIFAR-10, CIFAR-100 or STL-10 as torchvision stores them under ``root`` (never downloaded)."""
    import torchvision

    split = "train" if train else "test"
    try:
        if name == "stl10":
            data = torchvision.datasets.STL10(str(root), split=split, download=False)
            array, channels_first, labels = data.data, True, np.asarray(data.labels)
        elif name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            data = cls(str(root), train=train, download=False)
            array, channels_first, labels = data.data, False, np.asarray(data.targets)
        else:
            raise ProtoclipError(f"Unknown torchvision data set '{name}'; choose one of {', '.join(TORCHVISION_SETS)}.")
    except RuntimeError as error:
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}[name]
        raise MissingInputError(
            f"{name} is not in {root} ({error}); extract the official archive so that {Path(root) / folder} exists."
        ) from error

    # Zero-shot uses the data set's own CLIP class names and templates; the files' class list must
    # be the one they describe, in the same order.
    if [c.replace("_", " ") for c in data.classes] != list(CLASSNAMES[name]):
        raise ProtoclipError(
            f"The class list of {name} in {root} is not {name}'s ({len(data.classes)} classes, first "
            f"'{data.classes[0] if data.classes else ''}'); extract the official archive there."
        )
    return ImageSet(
        name=f"{name}-{split}",
        fingerprint=_hash(name, Path(root).resolve(), split, len(array)),
        size=len(array),
        images=lambda transform: _ArrayImages(array, channels_first, transform),
        labels=labels.astype(np.int64),
        classnames=list(CLASSNAMES[name]),
        templates=list(TEMPLATES[name]),
        details={"root": str(root), "split": split, "templates": f"OpenAI CLIP {name} ({len(TEMPLATES[name])})"},
    )


def _shard_set(name: str, shards: list[Path], ground_truth: dict | None = None) -> ImageSet:
    """Image-text pairs of webdataset shards (captions from ``.txt``, or a ``captions`` list in the
    json); labels from the json's ``label`` when ``ground_truth`` names the classes."""
    rows: dict[int, int] = {}
    captions: list[list[str]] = []
    labels: list[int] = []
    for sample in iter_samples(shards, images=False, meta=True):
        if sample.key in rows:
            raise ProtoclipError(f"Key {sample.key} appears twice in the shards of {name}; keys must be unique.")
        rows[sample.key] = len(captions)
        extra = sample.meta.get("captions")
        captions.append(list(extra) if isinstance(extra, list) and extra else [sample.caption])
        if ground_truth is not None:
            labels.append(int(sample.meta["label"]))
    if not rows:
        raise ProtoclipError(f"The shards of {name} hold no samples.")
    return ImageSet(
        name=name,
        fingerprint=_files_fingerprint(shards),
        size=len(rows),
        images=lambda transform: _ShardImages(shards, rows, transform),
        labels=np.asarray(labels, dtype=np.int64) if ground_truth is not None else None,
        classnames=list(ground_truth["classes"]) if ground_truth else None,
        templates=(list(ground_truth.get("templates") or []) or None) if ground_truth else None,
        captions=captions,
        keys=np.fromiter(rows, dtype=np.int64),
        details={"shards": len(shards)},
    )


def embedded(workspace, dataset: str, split: str) -> ImageSet:
    """A split of a workspace data set (``protoclip download``); labelled when its manifest has ground truth."""
    manifest = workspace.dataset_manifest(dataset)
    return _shard_set(f"{dataset}-{split}", workspace.shards(dataset, split), manifest.get("ground_truth"))


def webdataset_pairs(pattern: str) -> ImageSet:
    """Image-text pairs from shards matching a glob (``/data/pairs/*.tar``) or a comma-separated list."""
    shards = sorted(Path(p) for part in pattern.split(",") for p in glob.glob(part.strip()))
    if not shards:
        raise MissingInputError(f"No shards match {pattern}; pass --root with a glob of .tar files.")
    return _shard_set(Path(pattern.split(",")[0]).parent.name or "webdataset", shards)


def coco(root: str | Path, captions_file: str | Path | None = None) -> ImageSet:
    """COCO val2017: ``ROOT/val2017/*.jpg`` and ``ROOT/annotations/captions_val2017.json`` (or ``captions_file``)."""
    root = Path(root)
    captions_path = Path(captions_file) if captions_file else root / "annotations" / "captions_val2017.json"
    if not captions_path.is_file():
        raise MissingInputError(
            f"COCO captions file {captions_path} does not exist; pass --captions with captions_val2017.json."
        )
    data = json.loads(captions_path.read_text())
    by_image: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(int(annotation["image_id"]), []).append(annotation["caption"].strip())
    images = sorted((img for img in data["images"] if int(img["id"]) in by_image), key=lambda img: int(img["id"]))
    image_dir = root / "val2017"
    paths = [image_dir / img["file_name"] for img in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingInputError(f"COCO image {missing[0]} is missing ({len(missing)} in all); expected ROOT/val2017/*.jpg.")
    return _caption_set("coco-val2017", paths, [by_image[int(img["id"])] for img in images])


def flickr30k(root: str | Path, split_file: str | Path, split: str = "test") -> ImageSet:
    """Flickr30k images under ``ROOT`` and the Karpathy split file (``dataset_flickr30k.json``)."""
    root = Path(root)
    split_path = Path(split_file) if split_file else root / "dataset_flickr30k.json"
    if not split_path.is_file():
        raise MissingInputError(f"Karpathy split file {split_path} does not exist; pass --captions dataset_flickr30k.json.")
    entries = [img for img in json.loads(split_path.read_text())["images"] if img.get("split") == split]
    if not entries:
        raise ProtoclipError(f"{split_path} lists no images in split '{split}'.")
    image_dir = root / "flickr30k-images" if (root / "flickr30k-images").is_dir() else root
    paths = [image_dir / img["filename"] for img in entries]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingInputError(f"Flickr30k image {missing[0]} is missing ({len(missing)} in all); expected ROOT/<filename>.jpg.")
    return _caption_set(f"flickr30k-{split}", paths, [[s["raw"].strip() for s in img["sentences"]] for img in entries])


def _caption_set(name: str, paths: list[Path], captions: list[list[str]]) -> ImageSet:
    return ImageSet(
        name=name,
        fingerprint=_files_fingerprint(paths),
        size=len(paths),
        images=lambda transform: _FileImages(paths, transform),
        captions=captions,
        details={"images": len(paths), "captions": sum(map(len, captions))},
    )

"""Readers of the data sets ``evaluate --dataset`` names, each into an :class:`ImageSet`.

Layouts (see docs/evaluation.md): an ImageFolder ``ROOT/<class>/<image>``; ImageNet
``ROOT/{train,val}/<wnid>/``; torchvision CIFAR-10/100 and STL-10 already on disk under ``ROOT``;
COCO ``ROOT/val2017/`` with ``captions_val2017.json``; Flickr30k images with the Karpathy split
file; webdataset shards of image-text pairs; the workspace's embedded data set (shards written by
``protoclip download``, ground truth in its manifest). The zero-shot suite's further layouts are in
:mod:`protoclip_cli.evaluation.data.suite_layouts`.
"""

from __future__ import annotations

import glob
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torchvision

from protoclip_cli.artifacts import MANIFEST, file_sha256
from protoclip_cli.data.remote import is_remote
from protoclip_cli.data.shards import iter_samples
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.data import class_folders
from protoclip_cli.evaluation.data.fingerprint import fingerprint
from protoclip_cli.evaluation.data.image_set import ImageSet, source_set
from protoclip_cli.evaluation.data.images import ArrayImages, ShardImages, file_sources
from protoclip_cli.evaluation.data.prompts import classes_and_templates, manifest_lists, read_classnames

TORCHVISION_SETS = ("cifar10", "cifar100", "stl10")
FOLDER_LAYOUT = "expected ROOT/<class>/<image files> with one folder per class."


def image_folder(root: str | Path, classnames_file: str | Path | None, name: str | None = None) -> ImageSet:
    """Any ImageFolder; class names from ``classnames_file`` (else the folder names)."""
    root = Path(root)
    folders, paths, labels = class_folders.scan(root, FOLDER_LAYOUT)
    classnames = read_classnames(classnames_file, folders) if classnames_file else [f.replace("_", " ") for f in folders]
    return source_set(name or root.name, file_sources(paths), {"root": str(root), "classes": len(folders)},
                      labels=labels, classnames=classnames)  # fmt: skip


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids, sorted (index i = class i), from timm (a dependency of open_clip)."""
    from timm.data import ImageNetInfo  # timm's tables of class names load only when ImageNet is read

    ids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(ids) != 1000 or list(ids) != sorted(ids):
        raise RuntimeError("timm's ImageNet-1k synset list is not the 1000 sorted wnids")
    return ids


def _imagenet_index(wnid_folders: list[str]) -> dict[str, int]:
    """Each ``val/<wnid>`` folder's ImageNet-1k class index, or what is wrong with the folders."""
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    unknown = [name for name in wnid_folders if name not in index]
    if unknown:
        raise ProtoclipError(
            f"Folder '{unknown[0]}' is not an ImageNet-1k wnid; the ImageNet root must hold one "
            "folder per class named by its wnid (e.g. val/n01440764/*.JPEG)."
        )
    return {name: index[name] for name in wnid_folders}


def imagenet(root: str | Path, split: str = "val") -> ImageSet:
    """ImageNet-1k ``ROOT/<split>/<wnid>/*.JPEG``: class i is the i-th sorted wnid (the usual
    ImageNet-1k index, which torchvision's ImageFolder also gives a full ``val/``), named by open_clip."""
    folder = Path(root) / split
    hint = f"expected {Path(root)}/{split}/<wnid>/*.JPEG (e.g. {split}/n01440764/) as in the ImageNet-1k {split} set."
    folders, paths, folder_labels = class_folders.scan(folder, hint)
    index = _imagenet_index(folders)
    labels = np.asarray([index[folders[label]] for label in folder_labels], dtype=np.int64)
    classnames, templates = classes_and_templates("imagenet")
    return source_set(f"imagenet-{split}", file_sources(paths), {"root": str(folder), "class_folders": len(folders)},
                      labels=labels, classnames=classnames, templates=templates)  # fmt: skip


def torchvision_set(name: str, root: str | Path, train: bool) -> ImageSet:
    """CIFAR-10, CIFAR-100 or STL-10 as torchvision stores them under ``root`` (never downloaded)."""
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
    classnames, templates = classes_and_templates(name)
    if [c.replace("_", " ") for c in data.classes] != classnames:
        raise ProtoclipError(
            f"The class list of {name} in {root} is not {name}'s ({len(data.classes)} classes, first "
            f"'{data.classes[0] if data.classes else ''}'); extract the official archive there."
        )
    return ImageSet(
        name=f"{name}-{split}",
        # The arrays come from torchvision's batch files: the folder, split and size tell them apart.
        fingerprint=fingerprint((), name, Path(root).resolve(), split, len(array)),
        size=len(array),
        images=lambda transform: ArrayImages(array, channels_first, transform),
        labels=labels.astype(np.int64),
        classnames=classnames,
        templates=templates,
        details={"root": str(root), "split": split, "templates": f"OpenAI CLIP {name} ({len(templates)})"},
    )


def _shard_set(name: str, shards: list[Path | str], ground_truth: dict | None = None, identity: str | None = None) -> ImageSet:
    """Image-text pairs of webdataset shards (captions from ``.txt``, or a ``captions`` list in the
    json); labels from the json's ``label`` when ``ground_truth`` names the classes. ``identity``
    tells remote shards apart for the feature cache (local files are known by their stat)."""
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
    classnames, templates = manifest_lists(ground_truth) if ground_truth else (None, None)
    return ImageSet(
        name=name,
        fingerprint=identity or fingerprint(shards),
        size=len(rows),
        images=lambda transform: ShardImages(shards, rows, transform),
        labels=np.asarray(labels, dtype=np.int64) if ground_truth is not None else None,
        classnames=classnames,
        templates=templates,
        captions=captions,
        keys=np.fromiter(rows, dtype=np.int64),
        details={"shards": len(shards)},
    )


def embedded(workspace, dataset: str, split: str) -> ImageSet:
    """A split of a workspace data set (``protoclip download``); labelled when its manifest has ground truth."""
    manifest = workspace.dataset_manifest(dataset)
    shards = workspace.shards(dataset, split)
    identity = None
    if any(is_remote(shard) for shard in shards):
        # Remote shards have no stat to read: they are known by their URLs and the data set's version.
        identity = fingerprint((), *shards, file_sha256(workspace.dataset_dir(dataset) / MANIFEST))
    return _shard_set(f"{dataset}-{split}", shards, manifest.get("ground_truth"), identity)


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
    return source_set(name, file_sources(paths), {"images": len(paths), "captions": sum(map(len, captions))},
                      captions=captions)  # fmt: skip

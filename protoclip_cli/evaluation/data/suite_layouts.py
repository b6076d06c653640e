"""The reference's zero-shot suite on disk: where each of its data sets is found under one folder.

The reference (megvii-research/protoclip) reports zero-shot top-1 on ImageNet, CIFAR-10, CIFAR-100,
STL-10, Birdsnap, Country211, Flowers102, GTSRB, Stanford Cars and UCF101, their mean, and COCO
retrieval. Each data set keeps its own class names and prompt templates
(:func:`protoclip_cli.evaluation.data.prompts.classes_and_templates`), whatever layout the images
come in.

Layouts looked for under ``ROOT``, first match wins (see docs/evaluation.md):
- CLIP_benchmark's webdataset: ``ROOT/wds_<name>/test/{nshards.txt,0.tar,...}`` (``cls`` labels,
  ``txt`` captions), its names (``wds_cars``, ``wds_vtab-flowers``, ``wds_mscoco_captions``, ...);
- torchvision's files: CIFAR/STL-10 batches, ``flowers-102/``, ``gtsrb/GTSRB/Final_Test/Images``
  with ``GT-final_test.csv``, ``stanford_cars/`` with its ``.mat`` annotations, ImageNet
  ``val/<wnid>/``, Country211 ``country211/test/<code>/``;
- the reference's class folders: ``ROOT/<name>/test/<class>/`` (UCF101: ``testlist01``).
"""

from __future__ import annotations

import csv
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from protoclip_cli.configs.evaluate import SUITE_DATASETS
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.data import class_folders, readers
from protoclip_cli.evaluation.data.image_set import ImageSet, source_set
from protoclip_cli.evaluation.data.images import file_sources
from protoclip_cli.evaluation.data.prompts import classes_and_templates, prompts_source

SUITE = SUITE_DATASETS
RETRIEVAL = "coco"
CLASSIFICATION = tuple(name for name in SUITE if name != RETRIEVAL)
# CLIP_benchmark's webdataset folder of each (``wds_<name>``; Hugging Face clip-benchmark/wds_<name>).
WDS_NAMES = {"imagenet": "imagenet1k", "cifar10": "vtab-cifar10", "cifar100": "vtab-cifar100", "stl10": "stl10",
             "country211": "country211", "flowers102": "vtab-flowers", "gtsrb": "gtsrb", "stanford_cars": "cars",
             "coco": "mscoco_captions"}  # fmt: skip
# Other folder names a data set is found under (CLIP_benchmark's --dataset_root names, COCO's year).
ALIASES = {"imagenet": ("imagenet1k",), "flowers102": ("flowers",), "stanford_cars": ("cars",), "coco": ("coco2017",)}
REFERENCE_SPLIT = {"ucf101": "testlist01"}
_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


# -- class folders (the reference's layout, Country211's) -------------------------------------------

def _reference_folders(folder: Path, name: str, classnames: list[str], templates: list) -> ImageSet:
    folders, paths, folder_labels = class_folders.scan(folder, f"expected {folder}/<class>/<images>.")
    classes = class_folders.folder_classes(folders, classnames)
    labels = [classes[label] for label in folder_labels]
    # Classes without images are no candidates (the reference drops Birdsnap's 9 empty test classes).
    present = sorted(set(labels))
    position = {c: i for i, c in enumerate(present)}
    return source_set(name, file_sources(paths), {"layout": "class folders", "root": str(folder)},
                      labels=np.asarray([position[c] for c in labels]), classnames=[classnames[c] for c in present],
                      templates=templates)  # fmt: skip


# -- torchvision's files ----------------------------------------------------------------------------

def _flowers102(base: Path) -> tuple[list[Path], list[int]]:
    """``flowers-102/``: ``setid.mat`` (``tstid``: test image ids), ``imagelabels.mat`` (1-based labels)."""
    from scipy.io import loadmat  # scipy only for the two suite layouts stored as .mat

    test_ids = loadmat(base / "setid.mat", squeeze_me=True)["tstid"].tolist()
    labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"].tolist()
    return [base / "jpg" / f"image_{i:05d}.jpg" for i in test_ids], [int(labels[i - 1]) - 1 for i in test_ids]


def _gtsrb(base: Path) -> tuple[list[Path], list[int]]:
    """``gtsrb/GT-final_test.csv`` (``Filename;...;ClassId``) naming ``GTSRB/Final_Test/Images/*.ppm``."""
    with open(base / "GT-final_test.csv") as f:
        rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    images = base / "GTSRB" / "Final_Test" / "Images"
    return [images / row["Filename"] for row in rows], [int(row["ClassId"]) for row in rows]


def _stanford_cars(base: Path) -> tuple[list[Path], list[int]]:
    """``stanford_cars/cars_test_annos_withlabels.mat`` (``fname``, 1-based ``class``) naming ``cars_test/``."""
    from scipy.io import loadmat

    annotations = loadmat(base / "cars_test_annos_withlabels.mat", squeeze_me=True)["annotations"]
    return [base / "cars_test" / str(a["fname"]) for a in annotations], [int(a["class"]) - 1 for a in annotations]


TORCHVISION_FILES = {  # data set -> (folder torchvision's class reads, file that marks it, reader)
    "flowers102": ("flowers-102", "setid.mat", _flowers102),
    "gtsrb": ("gtsrb", "GT-final_test.csv", _gtsrb),
    "stanford_cars": ("stanford_cars", "cars_test_annos_withlabels.mat", _stanford_cars),
}


# -- CLIP_benchmark's webdataset ----------------------------------------------------------------------

def _webdataset(folder: Path, name: str, classnames: list[str] | None, templates: list | None) -> ImageSet:
    """``test/nshards.txt`` and ``test/0.tar`` ... holding ``<key>.{webp,png,jpg}`` with ``<key>.cls``
    (classification) or ``<key>.txt`` (retrieval: one caption per line)."""
    shards = [folder / "test" / f"{i}.tar" for i in range(int((folder / "test" / "nshards.txt").read_text()))]
    sources, labels, captions = [], [], []
    for shard in shards:
        if not shard.is_file():
            raise MissingInputError(f"Shard {shard} is missing; test/nshards.txt lists {len(shards)} shards.")
        samples: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if member.isfile():
                    samples.setdefault(key, {})[ext.lower()] = member
            for key, parts in samples.items():
                image = next((parts[e] for e in _IMAGE_KEYS if e in parts), None)
                if image is None:
                    continue
                sources.append((str(shard), image.offset_data, image.size))
                if classnames is not None:
                    labels.append(int(tar.extractfile(parts["cls"]).read().decode().strip()))
                else:
                    captions.append(tar.extractfile(parts["txt"]).read().decode().splitlines())
    if classnames is not None and labels and max(labels) >= len(classnames):
        raise ProtoclipError(f"{folder} has label {max(labels)} but {name} has {len(classnames)} classes.")
    details = {"layout": "CLIP_benchmark webdataset", "root": str(folder)}
    if classnames is None:
        return source_set(name, sources, details, captions=captions)
    return source_set(name, sources, details, labels=np.asarray(labels, dtype=np.int64), classnames=classnames,
                      templates=templates)  # fmt: skip


# -- finding a data set ------------------------------------------------------------------------------

def _folders(root: Path, name: str) -> list[Path]:
    return [root / n for n in (name, *ALIASES.get(name, ()))]


def find(root: str | Path, name: str) -> ImageSet | None:
    """Suite data set ``name`` under ``root`` in the first layout found, or None."""
    root = Path(root)
    wds = root / f"wds_{WDS_NAMES[name]}" if name in WDS_NAMES else None
    if name == RETRIEVAL:
        if wds is not None and (wds / "test" / "nshards.txt").is_file():
            return _webdataset(wds, "mscoco_captions-test", None, None)
        folder = next((f for f in _folders(root, name) if (f / "annotations" / "captions_val2017.json").is_file()), None)
        return replace(readers.coco(folder), details={"layout": "COCO val2017", "root": str(folder)}) if folder else None
    classnames, templates = classes_and_templates(name)
    canonical = "imagenet-val" if name == "imagenet" else f"{name}-test"
    found = None
    if wds is not None and (wds / "test" / "nshards.txt").is_file():
        found = _webdataset(wds, canonical, classnames, templates)
    elif name == "imagenet":
        split = next(((f, s) for f in _folders(root, name) for s in ("val", "test") if (f / s).is_dir()), None)
        if split:
            found = replace(readers.imagenet(*split), details={"layout": "ImageNet wnid folders", "root": str(split[0])})
    elif name in readers.TORCHVISION_SETS:
        for folder in (root, *_folders(root, name)):
            try:
                found = replace(readers.torchvision_set(name, folder, train=False),
                                details={"layout": "torchvision", "root": str(folder)})
                break
            except MissingInputError:
                continue
    elif name in TORCHVISION_FILES:
        sub, marker, reader = TORCHVISION_FILES[name]
        base = next((f / sub for f in (root, *_folders(root, name)) if (f / sub / marker).is_file()), None)
        if base is not None:
            paths, labels = reader(base)
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise MissingInputError(f"{name} image {missing[0]} is missing ({len(missing)} in all).")
            found = source_set(canonical, file_sources(paths), {"layout": "torchvision", "root": str(base)},
                               labels=np.asarray(labels, dtype=np.int64), classnames=classnames, templates=templates)
    if found is None:  # the reference's class folders (Country211's torchvision layout is one too)
        split = REFERENCE_SPLIT.get(name, "test")
        folder = next((f / split for f in _folders(root, name) if (f / split).is_dir()), None)
        if folder is not None:
            found = _reference_folders(folder, canonical, classnames, templates)
    if found is None:
        return None
    if found.classnames is not None and len(found.classnames) > len(classnames):
        raise ProtoclipError(f"{name} under {root} has more classes than the {len(classnames)} it should have.")
    return replace(found, details={**found.details, "prompts": prompts_source(name)})

"""The reference's zero-shot suite: ten classification data sets and COCO retrieval from one folder.

The reference (megvii-research/protoclip) reports zero-shot top-1 on ImageNet, CIFAR-10, CIFAR-100,
STL-10, Birdsnap, Country211, Flowers102, GTSRB, Stanford Cars and UCF101, their mean, and COCO
retrieval. Each data set is classified with its own class names and prompt templates: those of
the CLIP paper, taken from open_clip, :mod:`prompts`, CLIP_benchmark or ``zeroshot_suite.json``
(see :func:`classes_and_templates`), whatever layout the images come in.

Layouts looked for under ``ROOT``, first match wins (see docs/evaluation.md):
- CLIP_benchmark's webdataset: ``ROOT/wds_<name>/test/{nshards.txt,0.tar,...}`` (``cls`` labels,
  ``txt`` captions), its names (``wds_cars``, ``wds_vtab-flowers``, ``wds_mscoco_captions``, ...);
- torchvision's files: CIFAR/STL-10 batches, ``flowers-102/``, ``gtsrb/GTSRB/Final_Test/Images``
  with ``GT-final_test.csv``, ``stanford_cars/`` with its ``.mat`` annotations, ImageNet
  ``val/<wnid>/``, Country211 ``country211/test/<code>/``;
- the reference's class folders: ``ROOT/<name>/test/<class>/`` (UCF101: ``testlist01``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from protoclip_cli.console import warn
from protoclip_cli.data.transforms import decode_image
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.evaluation.data import imagenet
from protoclip_cli.evaluation.data import readers as datasets
from protoclip_cli.evaluation.data.prompts import CLASSNAMES, TEMPLATES
from protoclip_cli.evaluation.data.readers import IMAGE_EXTENSIONS, ImageSet
from protoclip_cli.evaluation.tasks import glue as tasks

CLASSIFICATION = ("imagenet", "cifar10", "cifar100", "stl10", "birdsnap", "country211", "flowers102", "gtsrb",
                  "stanford_cars", "ucf101")  # fmt: skip
RETRIEVAL = "coco"
SUITE = CLASSIFICATION + (RETRIEVAL,)
# CLIP_benchmark's webdataset folder of each (``wds_<name>``; Hugging Face clip-benchmark/wds_<name>).
WDS_NAMES = {"imagenet": "imagenet1k", "cifar10": "vtab-cifar10", "cifar100": "vtab-cifar100", "stl10": "stl10",
             "country211": "country211", "flowers102": "vtab-flowers", "gtsrb": "gtsrb", "stanford_cars": "cars",
             "coco": "mscoco_captions"}  # fmt: skip
# Other folder names a data set is found under (CLIP_benchmark's --dataset_root names, COCO's year).
ALIASES = {"imagenet": ("imagenet1k",), "flowers102": ("flowers",), "stanford_cars": ("cars",), "coco": ("coco2017",)}
REFERENCE_SPLIT = {"ucf101": "testlist01"}
_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


# CLIP_benchmark's names of the data sets whose lists it ships (en_classnames.json, en_zeroshot_...json).
CLIP_BENCHMARK_LISTS = {"country211": "country211", "flowers102": "flowers", "gtsrb": "gtsrb", "stanford_cars": "cars"}


@lru_cache(maxsize=1)
def _bundled() -> dict:
    return json.loads((Path(__file__).with_name("zeroshot_suite.json")).read_text())["datasets"]


@lru_cache(maxsize=1)
def _clip_benchmark() -> tuple[dict, dict] | None:
    """CLIP_benchmark's English class names and templates, when it is installed."""
    try:
        import clip_benchmark
    except ImportError:
        return None
    folder = Path(clip_benchmark.__file__).parent / "datasets"
    try:
        names = json.loads((folder / "en_classnames.json").read_text())
        templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())
    except (OSError, ValueError):
        return None
    return names, templates


def classes_and_templates(name: str) -> tuple[list[str], list]:
    """The class names and templates of a suite data set (those of the CLIP paper, which the
    reference also uses), from the package that ships them: ImageNet open_clip's; CIFAR-10/100 and
    STL-10 :mod:`protoclip_cli.evaluation.data.prompts`; Country211, Flowers102, GTSRB and Stanford Cars
    CLIP_benchmark's (``{c}`` written ``{}``) when it is installed; otherwise, and for Birdsnap and
    UCF101 (shipped by neither), ``zeroshot_suite.json`` (openai/CLIP ``data/prompts.md``)."""
    return _lists(name)[:2]


def prompts_source(name: str) -> str:
    """Where :func:`classes_and_templates` takes ``name``'s lists from."""
    return _lists(name)[2]


def _lists(name: str) -> tuple[list[str], list, str]:
    if name == "imagenet":
        return imagenet.classnames(), imagenet.templates(), "open_clip"

    if name in CLASSNAMES:
        return list(CLASSNAMES[name]), list(TEMPLATES[name]), "protoclip_cli.evaluation.data.prompts"
    entry, shipped = _bundled()[name], _clip_benchmark()
    classes, templates, source = list(entry["classes"]), list(entry["templates"]), "zeroshot_suite.json"
    if shipped is not None and name in CLIP_BENCHMARK_LISTS:
        key, source = CLIP_BENCHMARK_LISTS[name], "clip_benchmark"
        classes = list(shipped[0].get(key, classes))  # CLIP_benchmark takes Stanford Cars' from torchvision
        templates = [t.replace("{c}", "{}") for t in shipped[1][key]]
    return classes, templates, source


# -- images from files or tar members ---------------------------------------------------------------

Source = tuple[str, int, int]  # (file, byte offset, size); size -1 = the whole file


def _decode(data: bytes, where: str) -> torch.Tensor:
    try:
        return decode_image(data)
    except RuntimeError:  # torchvision does not decode every format (GTSRB's PPM): PIL does
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except UnidentifiedImageError as error:
            raise ProtoclipError(f"Could not decode image {where}; remove or replace it.") from error
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class _Images(Dataset):
    def __init__(self, sources: Sequence[Source], transform: Callable) -> None:
        self.sources, self.transform = list(sources), transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        path, offset, size = self.sources[row]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if size < 0 else f.read(size)
        return row, self.transform(_decode(data, f"{path}@{offset}" if size >= 0 else path))


def _image_set(name: str, sources: list[Source], layout: str, root: Path, **fields) -> ImageSet:
    stats = sorted({s[0] for s in sources})
    digest = hashlib.sha256("\n".join(f"{p}:{Path(p).stat().st_size}:{Path(p).stat().st_mtime_ns}" for p in stats).encode())
    digest.update(repr([(s[1], s[2]) for s in sources]).encode())
    return ImageSet(name=name, fingerprint=digest.hexdigest(), size=len(sources),
                    images=lambda transform: _Images(sources, transform),
                    details={"layout": layout, "root": str(root)}, **fields)  # fmt: skip


def _files(paths: Sequence[Path]) -> list[Source]:
    return [(str(p), 0, -1) for p in paths]


# -- class folders (the reference's layout, Country211's) -------------------------------------------

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


def _class_folders(folder: Path, name: str, classnames: list[str], templates: list) -> ImageSet:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = folder_classes(names, classnames) if names else []
    paths, labels = [], []
    for sub, label in zip(names, classes):
        files = sorted(p for p in (folder / sub).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS + (".ppm",))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ProtoclipError(f"{folder} holds no images in class folders; expected {folder}/<class>/<images>.")
    # Classes without images are no candidates (the reference drops Birdsnap's 9 empty test classes).
    present = sorted(set(labels))
    position = {c: i for i, c in enumerate(present)}
    return _image_set(name, _files(paths), "class folders", folder, labels=np.asarray([position[c] for c in labels]),
                      classnames=[classnames[c] for c in present], templates=templates)


# -- torchvision's files ----------------------------------------------------------------------------

def _flowers102(base: Path) -> tuple[list[Path], list[int]]:
    """``flowers-102/``: ``setid.mat`` (``tstid``: test image ids), ``imagelabels.mat`` (1-based labels)."""
    from scipy.io import loadmat

    test_ids = loadmat(base / "setid.mat", squeeze_me=True)["tstid"].tolist()
    labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"].tolist()
    return [base / "jpg" / f"image_{i:05d}.jpg" for i in test_ids], [int(labels[i - 1]) - 1 for i in test_ids]


def _gtsrb(base: Path) -> tuple[list[Path], list[int]]:
    """``gtsrb/GT-final_test.csv`` (``Filename;...;ClassId``) naming ``GTSRB/Final_Test/Images/*.ppm``."""
    import csv

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
    if classnames is None:
        return _image_set(name, sources, "CLIP_benchmark webdataset", folder, captions=captions)
    return _image_set(name, sources, "CLIP_benchmark webdataset", folder, labels=np.asarray(labels, dtype=np.int64),
                      classnames=classnames, templates=templates)


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
        return replace(datasets.coco(folder), details={"layout": "COCO val2017", "root": str(folder)}) if folder else None
    classnames, templates = classes_and_templates(name)
    canonical = "imagenet-val" if name == "imagenet" else f"{name}-test"
    found = None
    if wds is not None and (wds / "test" / "nshards.txt").is_file():
        found = _webdataset(wds, canonical, classnames, templates)
    elif name == "imagenet":
        split = next(((f, s) for f in _folders(root, name) for s in ("val", "test") if (f / s).is_dir()), None)
        if split:
            found = replace(datasets.imagenet(*split), details={"layout": "ImageNet wnid folders", "root": str(split[0])})
    elif name in datasets.TORCHVISION_SETS:
        for folder in (root, *_folders(root, name)):
            try:
                found = replace(datasets.torchvision_set(name, folder, train=False), classnames=classnames,
                                templates=templates, details={"layout": "torchvision", "root": str(folder)})
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
            found = _image_set(canonical, _files(paths), "torchvision", base, labels=np.asarray(labels, dtype=np.int64),
                               classnames=classnames, templates=templates)
    if found is None:  # the reference's class folders (Country211's torchvision layout is one too)
        split = REFERENCE_SPLIT.get(name, "test")
        folder = next((f / split for f in _folders(root, name) if (f / split).is_dir()), None)
        if folder is not None:
            found = _class_folders(folder, canonical, classnames, templates)
    if found is None:
        return None
    if found.classnames is not None and len(found.classnames) > len(classnames):
        raise ProtoclipError(f"{name} under {root} has more classes than the {len(classnames)} it should have.")
    return replace(found, details={**found.details, "prompts": prompts_source(name)})


# -- the suite ---------------------------------------------------------------------------------------

def run_suite(
    model, root: str | Path, names: Sequence[str], cache_dir: Path | None, batch_size: int, workers: int
) -> dict:
    """Zero-shot top-1/top-5 on every suite data set found under ``root`` (or exactly ``names``),
    their mean top-1, and COCO retrieval: ``{"metrics", "members", "missing"}``."""
    members, missing = [], []
    for name in names or SUITE:
        data = find(root, name)
        if data is None:
            if names:
                raise MissingInputError(f"Suite data set {name} is not under {root} in any layout this suite reads; "
                                        "see docs/evaluation.md for the layouts.")
            missing.append(name)
            continue
        if name == RETRIEVAL:
            task, result = "retrieval", tasks.retrieval(model, data, cache_dir, batch_size, workers)
        else:
            task, result = "zeroshot", tasks.zeroshot(model, data, None, cache_dir, batch_size, workers)
        members.append({"suite": name, "task": task, "data": data.name, **data.details, **result})
    if not members:
        raise MissingInputError(
            f"No data set of the zero-shot suite is under {root}; expected folders such as {root}/cifar10/ (torchvision's "
            f"files), {root}/birdsnap/test/<class>/ or {root}/wds_cars/ (see docs/evaluation.md)."
        )
    if missing:
        warn(f"Not under {root}: {', '.join(missing)}; the mean covers the {len(members)} data set(s) found.")
    classification = [m for m in members if m["task"] == "zeroshot"]
    metrics = {f"{m['suite']}_top1": m["metrics"]["top1"] for m in classification}
    if classification:
        metrics["mean_top1"] = round(float(np.mean([m["metrics"]["top1"] for m in classification])), 4)
    for member in members:
        if member["task"] == "retrieval":
            metrics["coco_mean_recall"] = member["metrics"]["mean_recall"]
    return {"metrics": metrics, "members": members, "missing": missing,
            "classification_datasets": len(classification)}  # fmt: skip

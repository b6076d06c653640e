"""Class names and prompt templates of every evaluation data set, and where each list comes from.

Zero-shot classification puts each class name into each template; this module is the one place
that says which names and templates a data set gets (:func:`classes_and_templates`, the CLIP
paper's, which the ProtoCLIP reference evaluation also uses), with :func:`prompts_source` naming
the package that ships them:

- ImageNet-1k: open_clip's 1000 class names (index i = the i-th sorted wnid) and the 80 OpenAI
  templates (callables taking a class name);
- CIFAR-10, CIFAR-100, STL-10: the lists below, published with OpenAI CLIP (``data/prompts.md`` of
  openai/CLIP, "Prompts for Image Classification"; open_clip ships ImageNet's only): 18 templates
  for CIFAR-10 and CIFAR-100, 2 for STL-10, names in each data set's label order (torchvision's);
- Country211, Flowers102, GTSRB, Stanford Cars: CLIP_benchmark's ``en_classnames.json`` and
  ``en_zeroshot_classification_templates.json`` when it is installed; otherwise, and for Birdsnap
  and UCF101 (shipped by neither), ``zeroshot_suite.json`` next to this module (openai/CLIP
  ``data/prompts.md``; a test checks it equals CLIP_benchmark's lists).

Beyond the named data sets: a workspace data set's lists are in its manifest (``ground_truth``,
written by ``protoclip download``, :func:`manifest_lists`); an ImageFolder's names come from a
class-names file or its folder names, and ``--templates`` replaces any data set's templates
(:func:`read_classnames`, :func:`read_templates`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from protoclip_cli.errors import MissingInputError, ProtoclipError

_CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "cifar10": _CIFAR_TEMPLATES,
    "cifar100": _CIFAR_TEMPLATES,
    "stl10": ("a photo of a {}.", "a photo of the {}."),
}

CLASSNAMES: dict[str, tuple[str, ...]] = {
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ),
    "cifar100": (
        "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
        "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
        "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
        "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
        "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man",
        "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange", "orchid",
        "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew",
        "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
        "sweet pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout",
        "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
    ),
    "stl10": ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
}

# CLIP_benchmark's names of the data sets whose lists it ships (en_classnames.json, en_zeroshot_...json).
CLIP_BENCHMARK_LISTS = {"country211": "country211", "flowers102": "flowers", "gtsrb": "gtsrb", "stanford_cars": "cars"}


def imagenet_classnames() -> list[str]:
    """open_clip's 1000 ImageNet class names, in wnid-sorted index order."""
    import open_clip  # only when ImageNet's lists are asked for: open_clip loads torch and more

    return list(open_clip.IMAGENET_CLASSNAMES)


def imagenet_templates() -> list:
    """The 80 OpenAI prompt templates (callables taking a class name); also the zero-shot default
    for a data set without templates of its own."""
    import open_clip

    return list(open_clip.OPENAI_IMAGENET_TEMPLATES)


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
    """The class names and templates of the named data set (ImageNet, CIFAR-10/100, STL-10 or a
    member of the zero-shot suite), from the package that ships them (see the module's docstring);
    CLIP_benchmark's ``{c}`` is written ``{}``."""
    return _lists(name)[:2]


def prompts_source(name: str) -> str:
    """Where :func:`classes_and_templates` takes ``name``'s lists from."""
    return _lists(name)[2]


def _lists(name: str) -> tuple[list[str], list, str]:
    if name == "imagenet":
        return imagenet_classnames(), imagenet_templates(), "open_clip"
    if name in CLASSNAMES:
        return list(CLASSNAMES[name]), list(TEMPLATES[name]), __name__
    entry, shipped = _bundled()[name], _clip_benchmark()
    classes, templates, source = list(entry["classes"]), list(entry["templates"]), "zeroshot_suite.json"
    if shipped is not None and name in CLIP_BENCHMARK_LISTS:
        key, source = CLIP_BENCHMARK_LISTS[name], "clip_benchmark"
        classes = list(shipped[0].get(key, classes))  # CLIP_benchmark takes Stanford Cars' from torchvision
        templates = [t.replace("{c}", "{}") for t in shipped[1][key]]
    return classes, templates, source


def manifest_lists(ground_truth: dict) -> tuple[list[str], list[str] | None]:
    """The class names and templates a workspace data set's manifest records (its ``ground_truth``);
    templates None when it records none (zero-shot then uses its default)."""
    return list(ground_truth["classes"]), list(ground_truth.get("templates") or []) or None


# -- a user's files: --classnames, --templates --------------------------------------------------------


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

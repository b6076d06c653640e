"""The embedded data set: procedurally rendered scenes of coloured shapes with paraphrased captions.

Every scene is a pure function of ``(split, seed, index)``, so any sample can be regenerated from
the ``index`` stored in its metadata. A scene has a main object class (colour + shape, 36 classes),
drawn one to three times at one size in one region of a background, and sometimes a smaller
distractor of another class. Captions are drawn from many templates and synonym sets, so the same
class is described by different words in different orders (a text teacher sees paraphrases), and
every caption names the main object's colour and shape (or synonyms of them).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw
from protoclip_cli.errors import write_error

SPLITS = ("train", "heldout")
GENERATOR_VERSION = 1  # bump when scenes, captions or rendering change (invalidates cached renderings)

# Canonical colour name -> (RGB, synonyms used in captions; the canonical word is one of them).
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((220, 30, 40), ("red", "crimson", "scarlet")),
    "green": ((40, 170, 60), ("green", "emerald", "leafy green")),
    "blue": ((40, 80, 220), ("blue", "azure", "cobalt")),
    "yellow": ((240, 210, 30), ("yellow", "golden", "lemon")),
    "purple": ((140, 50, 180), ("purple", "violet", "plum")),
    "orange": ((245, 130, 20), ("orange", "amber", "tangerine")),
}

# Canonical shape name -> synonyms as (singular, plural).
SHAPES: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round dot", "round dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("wedge", "wedges"), ("three-sided shape", "three-sided shapes")),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars"), ("starburst", "starbursts")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus shape", "plus shapes")),
    "ring": (("ring", "rings"), ("hoop", "hoops"), ("donut", "donuts")),
}

CLASS_NAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)

# Zero-shot prompts: '{}' is a class name such as 'red circle'.
TEMPLATES: tuple[str, ...] = (
    "a picture of a {}.",
    "a {} shape.",
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image showing a {}.",
    "a {} on a plain background.",
)

# size name -> (fraction of the image the object spans, caption words)
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {
    "small": (0.22, ("small", "little", "tiny")),
    "medium": (0.34, ("medium", "mid-sized", "moderate")),
    "large": (0.48, ("large", "big", "huge")),
}

# region name -> (centre as fractions of the image, adverbial phrases, noun phrases)
POSITIONS: dict[str, tuple[tuple[float, float], tuple[str, ...], tuple[str, ...]]] = {
    "left": ((0.3, 0.5), ("on the left", "at the left side", "to the left"), ("left side", "the left")),
    "right": ((0.7, 0.5), ("on the right", "at the right side", "to the right"), ("right side", "the right")),
    "top": ((0.5, 0.3), ("at the top", "near the top", "up top"), ("top", "upper part")),
    "bottom": ((0.5, 0.7), ("at the bottom", "near the bottom", "down low"), ("bottom", "lower part")),
    "centre": ((0.5, 0.5), ("in the centre", "in the middle", "at the center"), ("centre", "middle")),
}

# background name -> caption words (rendering in _background)
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "dark": ("dark", "black", "night-dark"),
    "light": ("light", "white", "pale"),
    "grey": ("grey", "gray", "slate"),
    "gradient": ("gradient", "fading", "shaded"),
    "noisy": ("noisy", "speckled", "grainy"),
}

COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a trio of")}

# Caption templates. Slots: {n} count phrase, {size}, {colour}, {shape} (number-agreed), {where}
# adverbial position, {place} noun position, {bg} background word, {be} is/are, {extra} distractor
# clause (may be empty). Different orders and framings give paraphrases of the same scene.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{n} {size} {colour} {shape} {where} on a {bg} background{extra}",
    "{place}: {n} {size} {colour} {shape}{extra}",
    "{n} {colour} {shape} {where}{extra}",
    "there {be} {n} {colour} {shape} {where}{extra}",
    "a picture of {n} {size} {colour} {shape}{extra}",
    "{colour} {shape}, {size}, {where}, {bg} backdrop",
    "{n} {shape} in {colour} {where} against a {bg} background",
    "close-up of {n} {colour} {shape} on a {bg} background{extra}",
    "{n} {size} {shape} coloured {colour}, {where}",
    "{bg} background with {n} {colour} {shape} {where}{extra}",
    "{where} {be} {n} {size} {colour} {shape}",
    "simple drawing: {n} {colour} {shape}{extra}",
    "the {place} shows {n} {colour} {shape}",
    "{n} {shape}, {colour} and {size}, {where}",
    "an illustration of {n} {size} {colour} {shape} over a {bg} background",
)

_SUPERSAMPLE = 2  # render at twice the size and downsample, for smooth edges


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: class parts and its box in fractions of the image."""

    colour: str
    shape: str
    cx: float
    cy: float
    extent: float  # width and height as a fraction of the image
    angle: float  # degrees; stars, triangles and crosses are rotated a little


@dataclass(frozen=True)
class Scene:
    """A scene's ground truth (all attributes of its main object) and its caption."""

    index: int
    split: str
    seed: int
    label: int
    class_name: str
    colour: str
    shape: str
    size: str
    position: str
    count: int
    background: str
    distractor: str  # class name of the smaller second object, '' if none
    caption: str
    objects: tuple[SceneObject, ...]

    def attributes(self) -> dict[str, object]:
        """Ground-truth attributes as flat scalars (the extra columns of the URL list)."""
        data = asdict(self)
        data.pop("objects")
        data.pop("caption")
        return data


ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "index", "split", "seed", "label", "class_name", "colour", "shape", "size",
    "position", "count", "background", "distractor",
)  # fmt: skip


def colour_words(colour: str) -> tuple[str, ...]:
    """Caption words that name ``colour``."""
    return COLOURS[colour][1]


def shape_words(shape: str) -> tuple[str, ...]:
    """Caption words (singular and plural) that name ``shape``."""
    return tuple(word for pair in SHAPES[shape] for word in pair)


def caption_names_class(caption: str, colour: str, shape: str) -> bool:
    """True when ``caption`` contains a word for ``colour`` and one for ``shape``."""
    text = caption.lower()

    def names(words: tuple[str, ...]) -> bool:
        # Whole words only: 'red' must not match inside 'coloured'.
        return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text) for w in words)

    return names(colour_words(colour)) and names(shape_words(shape))


def _rng(split: str, seed: int, index: int) -> random.Random:
    # A string seed is hashed (sha512) by random.Random: independent streams per split and seed.
    return random.Random(f"protoclip-synthetic:{split}:{seed}:{index}")


def _label(split: str, seed: int, index: int) -> int:
    """Classes cycle through a fresh permutation every 36 samples, so every split is balanced."""
    block, offset = divmod(index, len(CLASS_NAMES))
    order = list(range(len(CLASS_NAMES)))
    random.Random(f"protoclip-synthetic-labels:{split}:{seed}:{block}").shuffle(order)
    return order[offset]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _layout(rng: random.Random, colour: str, shape: str, size: str, position: str, count: int) -> list[SceneObject]:
    extent = SIZES[size][0] * (1.0 if count == 1 else 0.75 if count == 2 else 0.6)
    (cx, cy), _, _ = POSITIONS[position]
    spread = extent * 0.75
    objects = []
    # Copies sit side by side (or in a small triangle) around the region's centre.
    for i in range(count):
        if count == 1:
            dx, dy = 0.0, 0.0
        else:
            theta = 2 * math.pi * i / count + rng.uniform(-0.3, 0.3)
            dx, dy = spread * math.cos(theta), spread * math.sin(theta)
        jitter = 0.04
        x = min(max(cx + dx + rng.uniform(-jitter, jitter), extent / 2), 1 - extent / 2)
        y = min(max(cy + dy + rng.uniform(-jitter, jitter), extent / 2), 1 - extent / 2)
        objects.append(SceneObject(colour, shape, x, y, extent, rng.uniform(-20, 20)))
    return objects


def scene(index: int, seed: int = 0, split: str = "train") -> Scene:
    """The scene number ``index`` of ``split`` for ``seed`` (attributes, caption and layout)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _rng(split, seed, index)
    label = _label(split, seed, index)
    colour, shape = CLASS_NAMES[label].split(" ")
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS))
    count = rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0]
    background = rng.choice(list(BACKGROUNDS))
    objects = _layout(rng, colour, shape, size, position, count)

    distractor = ""
    if rng.random() < 0.3:
        other = rng.choice([c for c in CLASS_NAMES if c != CLASS_NAMES[label]])
        d_colour, d_shape = other.split(" ")
        # Opposite corner from the main objects' region, smaller than them.
        (cx, cy), _, _ = POSITIONS[position]
        ext = 0.16
        dx = 0.12 if cx >= 0.5 else 0.88
        dy = 0.12 if cy >= 0.5 else 0.88
        objects.insert(0, SceneObject(d_colour, d_shape, dx, dy, ext, rng.uniform(-20, 20)))
        distractor = other

    caption = _caption(rng, colour, shape, size, position, count, background, distractor)
    return Scene(
        index=index, split=split, seed=seed, label=label, class_name=CLASS_NAMES[label], colour=colour,
        shape=shape, size=size, position=position, count=count, background=background,
        distractor=distractor, caption=caption, objects=tuple(objects),
    )  # fmt: skip


def _caption(
    rng: random.Random, colour: str, shape: str, size: str, position: str, count: int, background: str, distractor: str
) -> str:
    singular, plural = rng.choice(SHAPES[shape])
    shape_word = singular if count == 1 else plural
    size_word = rng.choice(SIZES[size][1])
    colour_word = rng.choice(colour_words(colour))
    n = rng.choice(COUNT_WORDS[count])
    extra = ""
    if distractor and rng.random() < 0.6:
        d_colour, d_shape = distractor.split(" ")
        d_words = f"{rng.choice(colour_words(d_colour))} {rng.choice(SHAPES[d_shape])[0]}"
        extra = f"{rng.choice((' next to ', ' and ', ' beside '))}{_article(d_words)} {d_words}"
    template = rng.choice(CAPTION_TEMPLATES)
    slots = {
        "n": n,
        "size": size_word,
        "colour": colour_word,
        "shape": shape_word,
        "where": rng.choice(POSITIONS[position][1]),
        "place": rng.choice(POSITIONS[position][2]),
        "bg": rng.choice(BACKGROUNDS[background]),
        "be": "is" if count == 1 else "are",
        "extra": extra,
    }
    text = template.format(**slots)
    # 'a' before a vowel: fix the count article wherever it landed.
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "A") and words[i + 1][:1].lower() in "aeiou" and words[i + 1]:
            words[i] = "an" if words[i] == "a" else "An"
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _background(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    if name == "dark":
        base = np.full((size, size, 3), rng.integers(10, 45), dtype=np.uint8)
    elif name == "light":
        base = np.full((size, size, 3), rng.integers(215, 250), dtype=np.uint8)
    elif name == "grey":
        base = np.full((size, size, 3), rng.integers(100, 150), dtype=np.uint8)
    elif name == "gradient":
        start, stop = sorted(rng.integers(20, 235, size=2))
        ramp = np.linspace(start, stop, size, dtype=np.float32)
        base = np.repeat(np.repeat(ramp[:, None, None], size, axis=1), 3, axis=2).astype(np.uint8)
        if rng.random() < 0.5:
            base = base.transpose(1, 0, 2).copy()
    else:  # noisy
        level = int(rng.integers(60, 190))
        base = np.clip(level + rng.normal(0, 35, (size, size, 1)), 0, 255).astype(np.uint8).repeat(3, axis=2)
    return Image.fromarray(base, "RGB")


Point = tuple[float, float]


def _polygon(cx: float, cy: float, radius: float, points: list[Point], angle: float) -> list[Point]:
    rad = math.radians(angle)
    cos, sin = math.cos(rad), math.sin(rad)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _star_points(inner: float = 0.45) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else inner
        theta = -math.pi / 2 + i * math.pi / 5
        points.append((r * math.cos(theta), r * math.sin(theta)))
    return points


_UNIT_SHAPES = {
    "triangle": [(0.0, -1.0), (0.92, 0.75), (-0.92, 0.75)],
    "star": _star_points(),
    "cross": [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1),
              (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)],
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
}  # fmt: skip


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, canvas: int) -> None:
    rgb = COLOURS[obj.colour][0]
    cx, cy, radius = obj.cx * canvas, obj.cy * canvas, obj.extent * canvas / 2
    if obj.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rgb)
    elif obj.shape == "ring":
        width = max(2 * _SUPERSAMPLE, int(radius * 0.4))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=rgb, width=width)
    else:
        # Squares stay axis-aligned-ish: a small tilt keeps them distinct from diamonds.
        angle = obj.angle * (0.3 if obj.shape == "square" else 1.0)
        draw.polygon(_polygon(cx, cy, radius, _UNIT_SHAPES[obj.shape], angle), fill=rgb)


def render(item: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``item`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
    canvas = image_size * _SUPERSAMPLE
    noise_rng = np.random.default_rng([SPLITS.index(item.split), item.seed, item.index])
    image = _background(item.background, canvas, noise_rng)
    draw = ImageDraw.Draw(image)
    for obj in item.objects:
        _draw(draw, obj, canvas)
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)


def scenes(count: int, seed: int = 0, split: str = "train") -> Iterator[Scene]:
    """Scenes ``0 .. count-1`` of ``split``."""
    for index in range(count):
        yield scene(index, seed, split)


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_images(folder: str | Path, count: int, seed: int = 0, split: str = "train", image_size: int = 64,
                 quality: int = 95, on_image=None) -> list[Scene]:  # fmt: skip
    """Render scenes ``0 .. count-1`` of ``split`` to ``folder/<index>.jpg``; return the scenes.

    ``on_image`` (optional) is called after each image, for progress reporting. A write that fails
    (a full disk) is a WriteError naming the image.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for item in scenes(count, seed, split):
        path = folder / f"{item.index:06d}.jpg"
        try:
            render(item, image_size).save(path, format="JPEG", quality=quality)
        except OSError as exc:  # PIL's failed write names no file
            raise write_error(path, exc) from exc
        items.append(item)
        if on_image is not None:
            on_image()
    return items


def ground_truth() -> dict[str, object]:
    """What a data set manifest records of the embedded set's labels (evaluation reads it)."""
    return {"attribute": "class_name", "classes": list(CLASS_NAMES), "templates": list(TEMPLATES),
            "attributes": list(ATTRIBUTE_COLUMNS)}


def write_shard(folder: str | Path, shard_id: int, items: Iterable[Scene], image_size: int = 64) -> tuple[str, int]:
    """Scenes written straight into one webdataset shard laid out as img2dataset lays its shards
    (``<key>.jpg``, ``.txt``, ``.json`` with the ground truth; ``<shard>_stats.json``), without
    img2dataset: for benchmarks and quick tests (``protoclip download synthetic`` goes through
    img2dataset). Returns (shard file name, samples)."""
    folder = Path(folder)
    name = f"{shard_id:05d}.tar"
    count = 0
    with tarfile.open(folder / name, "w") as tar:
        for offset, item in enumerate(items):
            key = f"{shard_id:05d}{offset:04d}"
            members = {
                "jpg": jpeg_bytes(render(item, image_size)),
                "txt": item.caption.encode(),
                "json": json.dumps({"key": key, "caption": item.caption, **item.attributes()}).encode(),
            }
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({"successes": count, "count": count}))
    return name, count

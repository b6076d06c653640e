"""The embedded data set generator: deterministic scenes, captions naming their class, paraphrases."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from protoclip_cli.data import synthetic


def test_same_seed_gives_the_same_scenes_and_pixels():
    for index in (0, 7, 123):
        a, b = synthetic.scene(index, seed=3), synthetic.scene(index, seed=3)
        assert a == b
        assert np.array_equal(np.asarray(synthetic.render(a)), np.asarray(synthetic.render(b)))


def test_seeds_and_splits_give_different_scenes():
    def captions(seed: int, split: str) -> list[str]:
        return [s.caption for s in synthetic.scenes(50, seed, split)]

    base = captions(0, "train")
    assert captions(1, "train") != base
    assert captions(0, "heldout") != base
    # Streams differ sample by sample, not just by a shift: few captions coincide at the same index.
    assert sum(a == b for a, b in zip(base, captions(1, "train"))) < 10
    assert sum(a == b for a, b in zip(base, captions(0, "heldout"))) < 10


def test_classes_templates_and_attributes():
    assert len(synthetic.CLASS_NAMES) == len(set(synthetic.CLASS_NAMES)) == 36
    assert all("{}" in t for t in synthetic.TEMPLATES)
    item = synthetic.scene(5, seed=0, split="heldout")
    attributes = item.attributes()
    assert tuple(attributes) == synthetic.ATTRIBUTE_COLUMNS
    assert attributes["class_name"] == f"{item.colour} {item.shape}" == synthetic.CLASS_NAMES[item.label]
    assert attributes["index"] == 5 and attributes["split"] == "heldout"
    assert 1 <= item.count <= 3
    # One drawn object per copy of the main class, plus the distractor when there is one.
    main = [o for o in item.objects if (o.colour, o.shape) == (item.colour, item.shape)]
    assert len(main) >= item.count and len(item.objects) == item.count + bool(item.distractor)


def test_every_block_of_36_holds_each_class_once():
    labels = [s.label for s in synthetic.scenes(72, seed=4)]
    assert sorted(labels[:36]) == list(range(36)) and sorted(labels[36:]) == list(range(36))
    assert labels[:36] != labels[36:]


def test_captions_name_the_main_class_and_attributes_vary():
    items = list(synthetic.scenes(600, seed=0))
    for item in items:
        assert synthetic.caption_names_class(item.caption, item.colour, item.shape), item.caption
    for attribute in ("size", "position", "count", "background"):
        values = Counter(getattr(item, attribute) for item in items)
        assert len(values) >= 3, (attribute, values)
    assert 0.15 < sum(bool(item.distractor) for item in items) / len(items) < 0.45


def test_caption_check_matches_whole_words_only():
    assert synthetic.caption_names_class("Two big scarlet donuts on the left", "red", "ring")
    assert not synthetic.caption_names_class("Two big donuts coloured blue", "red", "ring")
    assert not synthetic.caption_names_class("A red starburst", "red", "ring")


def test_paraphrases_exist_for_every_class():
    by_class: dict[str, set[str]] = defaultdict(set)
    for item in synthetic.scenes(36 * 8, seed=0):
        by_class[item.class_name].add(item.caption)
        # Same class and count, different words: the template and synonym choices vary.
    assert set(by_class) == set(synthetic.CLASS_NAMES)
    assert all(len(captions) == 8 for captions in by_class.values())
    colour_synonyms = {w for item in synthetic.scenes(200) for w in synthetic.colour_words(item.colour)
                       if w in item.caption.lower()}  # fmt: skip
    assert {"crimson", "azure", "violet"} & colour_synonyms and {"red", "blue"} & colour_synonyms


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_draws_the_main_colour_at_the_configured_size(image_size):
    for index in range(20):
        item = synthetic.scene(index, seed=1)
        pixels = np.asarray(synthetic.render(item, image_size), dtype=np.float64)
        assert pixels.shape == (image_size, image_size, 3)
        target = np.array(synthetic.COLOURS[item.colour][0], dtype=np.float64)
        # Some pixels are (close to) the main colour: the object was drawn.
        distance = np.abs(pixels - target).sum(axis=2)
        assert (distance < 30).sum() >= 4, (index, item.class_name)


def test_write_images_is_fast_and_decodable(tmp_path):
    import time

    from PIL import Image

    started = time.perf_counter()
    items = synthetic.write_images(tmp_path, 300, seed=2, split="heldout", image_size=64)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"rendering 300 images took {elapsed:.1f} s"
    assert [item.index for item in items] == list(range(300))
    files = sorted(tmp_path.glob("*.jpg"))
    assert len(files) == 300
    with Image.open(files[17]) as image:
        assert image.size == (64, 64) and image.format == "JPEG"

"""An evaluation split written in CLIP_benchmark's webdataset layout, so that ``clip_benchmark eval``
scores a model on the very images, class names and templates ``protoclip evaluate`` used.

The layout is the one ``clip_benchmark.datasets.builder.build_wds_dataset`` reads
(``clip_benchmark eval --dataset wds/NAME --dataset_root DIR``)::

    DIR/test/nshards.txt                              how many shards
    DIR/test/0.tar, 1.tar, ...                        s0000000.png + s0000000.cls (class index), ...
    DIR/classnames.txt                                one class name per line, in label order
    DIR/zeroshot_classification_templates.txt         one template per line, CLIP_benchmark's {c}

Images are the decoded pixels this project's reader gave (``evaluation/data/images.py``), stored as
PNG, which is lossless: CLIP_benchmark's PIL decoding gets the same pixels, whatever JPEG decoder
either side has. Shards are written with webdataset's own ``ShardWriter``, as CLIP_benchmark's
``clip_benchmark_export_wds`` writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset
from torchvision.io import encode_png

from protoclip_cli.artifacts import atomic_dir
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data.image_set import ImageSet

SPLIT = "test"
CLASSNAMES, TEMPLATES, SHARD_COUNT = "classnames.txt", "zeroshot_classification_templates.txt", "nshards.txt"
_PLACEHOLDER = "\x00classname\x00"


def benchmark_template(template: str | Callable[[str], str]) -> str:
    """A template in CLIP_benchmark's form (``template.format(c=classname)``): this project's
    ``"a photo of a {}."`` strings and open_clip's callables both become ``"a photo of a {c}."``."""
    text = template(_PLACEHOLDER) if callable(template) else template.replace("{}", _PLACEHOLDER)
    if "\n" in text or _PLACEHOLDER not in text:
        raise ProtoclipError(f"Template {text!r} has no place for the class name or spans lines; CLIP_benchmark's file needs one line with it.")
    return text.replace("{", "{{").replace("}", "}}").replace(_PLACEHOLDER, "{c}")


def _rows_and_images(data: ImageSet) -> Iterator[tuple[int, torch.Tensor]]:
    dataset = data.images(lambda image: image)  # decoded uint8 (3, H, W), untransformed
    if isinstance(dataset, IterableDataset):
        yield from dataset
    else:
        for index in range(len(dataset)):
            yield dataset[index]


def is_benchmark_wds(folder: Path) -> bool:
    return (Path(folder) / SPLIT / SHARD_COUNT).is_file()


def write_benchmark_wds(data: ImageSet, templates: Sequence, out: Path, max_count: int = 10_000) -> dict:
    """Write ``data`` (labelled) with ``templates`` to ``out`` in CLIP_benchmark's layout; returns
    ``{"folder", "images", "shards"}``. An existing ``out`` is replaced only when it is such an export."""
    import webdataset as wds

    labels = data.require_labels("a CLIP_benchmark export")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_benchmark_wds(out))):
        raise ProtoclipError(f"--export-wds {out} exists and is no CLIP_benchmark webdataset; pass a new folder.")
    lines = [benchmark_template(t) for t in templates]
    written = 0
    with atomic_dir(out) as tmp:
        (tmp / SPLIT).mkdir()
        with wds.ShardWriter(str(tmp / SPLIT / "%d.tar"), maxcount=max_count, verbose=0) as sink:
            for row, image in _rows_and_images(data):
                sink.write({"__key__": f"s{int(row):07d}", "png": encode_png(image).numpy().tobytes(),
                            "cls": str(int(labels[row])).encode()})
                written += 1
            shards = sink.shard
        if written != data.size:
            raise ProtoclipError(f"{data.name} gave {written} of its {data.size} images; its data is damaged, nothing was written.")
        (tmp / SPLIT / SHARD_COUNT).write_text(f"{shards}\n")
        (tmp / CLASSNAMES).write_text("".join(f"{name}\n" for name in data.classnames))
        (tmp / TEMPLATES).write_text("".join(f"{line}\n" for line in lines))
    return {"folder": str(out), "images": written, "shards": shards}

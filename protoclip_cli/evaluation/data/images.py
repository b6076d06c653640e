"""Evaluation images as torch data sets of ``(row, uint8 (3, H, W))``, all decoded by one reader.

:func:`decode` is torchvision's decoder (``data/transforms.decode_image``, the one training uses),
with PIL as its one fallback for what torchvision does not decode (GTSRB's PPM files, some BMP and
GIF variants), so that every layout accepts the same image files. Images come from files or tar
members (:class:`SourceImages`), arrays in memory (:class:`ArrayImages`, torchvision's CIFAR and
STL-10) or webdataset shards streamed per worker (:class:`ShardImages`).
"""

from __future__ import annotations

import io
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from protoclip_cli.data.shards import iter_samples
from protoclip_cli.data.transforms import decode_image
from protoclip_cli.errors import ProtoclipError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm")

Source = tuple[str, int, int]  # (file, byte offset, size); size -1 = the whole file


def decode(data: bytes, where: str) -> torch.Tensor:
    """uint8 (3, H, W) RGB of an encoded image; ``where`` names it in the error."""
    try:
        return decode_image(data)
    except RuntimeError:
        # PIL is imported only here: most evaluations never need it.
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ProtoclipError(f"Could not decode image {where} ({error}); remove or replace it.") from error
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def file_sources(paths: Sequence) -> list[Source]:
    """Whole image files as sources."""
    return [(str(path), 0, -1) for path in paths]


class SourceImages(Dataset):
    """Images in whole files or in tar members read by byte range (CLIP_benchmark's shards)."""

    def __init__(self, sources: Sequence[Source], transform: Callable) -> None:
        self.sources, self.transform = list(sources), transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        path, offset, size = self.sources[row]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if size < 0 else f.read(size)
        return row, self.transform(decode(data, f"{path}@{offset}" if size >= 0 else path))


class ArrayImages(Dataset):
    """uint8 images held in memory, (N, H, W, 3) or (N, 3, H, W)."""

    def __init__(self, array: np.ndarray, channels_first: bool, transform: Callable) -> None:
        self.array, self.channels_first, self.transform = array, channels_first, transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(self.array[row]))
        return row, self.transform(image if self.channels_first else image.permute(2, 0, 1))


class ShardImages(IterableDataset):
    """Images of webdataset shards; each data-loader worker streams its own shards."""

    def __init__(self, shards: Sequence, rows: dict[int, int], transform: Callable) -> None:
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
                yield self.rows[sample.key], self.transform(decode(sample.image, f"of sample {sample.key}"))

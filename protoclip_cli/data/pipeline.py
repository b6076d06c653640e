"""Webdataset loaders for training and for the per-episode extraction pass.

The shards of an episode are split by rank and then by data-loader worker (``shards[rank::world]``,
then ``[worker::workers]``), so the assignment is deterministic and a resumed or distributed run
reads the same samples in the same order. Inside a worker:

1. records stream from the worker's shards (webdataset), raw bytes only;
2. training shuffles them with a seeded buffer (seed, episode, rank, worker);
3. a resumed run skips the records of batches already trained on, before any decoding;
4. JPEGs are decoded to uint8 (``torchvision.io.decode_jpeg``) and transformed with v2 transforms on
   uint8; the random augmentation of a sample is seeded by (seed, episode, key), so it does not
   depend on which rank or worker reads it;
5. captions are tokenised with the model's tokenizer and samples are batched.

Batches are dicts ``images`` (B, 3, H, W) uint8, ``tokens`` (B, L) int64, ``keys`` (B,) int64 and
``broken`` (samples this worker skipped since its previous batch because they failed to decode).
Float conversion and normalisation happen on the device (:func:`protoclip_cli.data.transforms.normalize`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from protoclip_cli.training.episodes import split_for_worker

_SEED_MIX = 1_000_003


@dataclass
class LoaderSpec:
    """What one rank's loader reads and how it turns samples into batches."""

    shards: list[Path]  # this rank's shards of the episode, in order
    batch_size: int
    image_size: int
    tokenizer_arch: str
    train: bool  # train: shuffle, augmentation, full batches only; else eval transforms, every sample
    augmentation: str = "none"
    seed: int = 0
    episode: int = 0
    rank: int = 0
    shuffle_buffer: int = 0
    skip_batches: list[int] = field(default_factory=list)  # per worker, batches already done


def _records(urls: list[str]) -> Iterator[dict]:
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue))
    yield from pipeline


def shuffled(records: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """A seeded shuffle buffer: fill to ``buffer_size``, then emit a random element per new record."""
    if buffer_size <= 1:
        yield from records
        return
    buffer: list[dict] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], record = record, buffer[index]
        yield record
    rng.shuffle(buffer)
    yield from buffer


class EpisodeDataset(IterableDataset):
    """The batches of one rank over its shards of an episode (see the module docstring)."""

    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec
        self._transform: Callable | None = None
        self._tokenizer: Callable | None = None

    def _setup(self) -> None:
        from protoclip_cli.core.model import get_tokenizer
        from protoclip_cli.data.transforms import eval_transform, train_transform

        spec = self.spec
        if spec.train:
            self._transform = train_transform(spec.augmentation, spec.image_size)
        else:
            self._transform = eval_transform(spec.image_size)
        self._tokenizer = get_tokenizer(spec.tokenizer_arch)

    def _transform_sample(self, image: torch.Tensor, key: int) -> torch.Tensor:
        if not self.spec.train:
            return self._transform(image)
        # The augmentation of a sample is a function of (seed, episode, key) only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.spec.seed * _SEED_MIX + self.spec.episode) * _SEED_MIX + key)
            return self._transform(image)

    def __iter__(self) -> Iterator[dict]:
        from protoclip_cli.data.transforms import decode_image

        if self._transform is None:
            self._setup()
        spec = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = [str(p) for p in split_for_worker(list(spec.shards), worker, workers)]
        if not urls:
            return
        records: Iterator[dict] = _records(urls)
        if spec.train:
            rng = random.Random((spec.seed * _SEED_MIX + spec.episode) * _SEED_MIX + spec.rank * 1000 + worker)
            records = shuffled(records, spec.shuffle_buffer, rng)
        skip = spec.skip_batches[worker] * spec.batch_size if worker < len(spec.skip_batches) else 0
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[int] = []
        broken = 0
        for record in records:
            if skip > 0:
                skip -= 1
                continue
            try:
                key = int(record["__key__"].rsplit("/", 1)[-1])
                caption = record["txt"].decode("utf-8")
                image = self._transform_sample(decode_image(record["jpg"]), key)
            except Exception:  # a broken sample is skipped and counted, never fatal
                broken += 1
                continue
            images.append(image)
            captions.append(caption)
            keys.append(key)
            if len(images) == spec.batch_size:
                yield self._batch(images, captions, keys, broken)
                images, captions, keys, broken = [], [], [], 0
        if images and not spec.train:
            yield self._batch(images, captions, keys, broken)

    def _batch(self, images: list[torch.Tensor], captions: list[str], keys: list[int], broken: int) -> dict:
        return {
            "images": torch.stack(images),
            "tokens": self._tokenizer(captions),
            "keys": torch.tensor(keys, dtype=torch.int64),
            "broken": broken,
        }


def make_loader(spec: LoaderSpec, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over :class:`EpisodeDataset`; batches are formed inside the workers."""
    return DataLoader(
        EpisodeDataset(spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )

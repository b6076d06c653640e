"""One rank's data loader for every pass of a run: webdataset shards to uint8 batches.

A run alternates passes over its episodes (an extraction pass and a training pass per prototype
episode, a training pass otherwise). :class:`EpisodeStream` serves them all from ONE DataLoader
with persistent workers: starting a pass writes what to read into a small shared-memory tensor and
restarts the workers' iteration, so workers (and their tokenizer, open shards' page cache) survive
from pass to pass, and a pass's first batches are prefetched while the trainer still does other
work (clustering, a checkpoint) once its iterator exists.

Which worker reads what is a pure function of the plan. The shards of an episode are split by rank
and then by data-loader worker (``shards[rank::world]``, then ``[worker::workers]``). Inside a worker:

1. records stream from the worker's shards (webdataset), raw bytes only;
2. training shuffles them with a seeded buffer (seed, episode, rank, worker, round);
3. JPEGs are decoded to uint8 (``torchvision.io.decode_jpeg``) and cropped/resized with v2
   transforms on uint8; the random crop (and, for ``light``, the per-sample photometric parameters
   applied later on the device, :mod:`protoclip_cli.data.augment`) are seeded by (seed, episode,
   key), so they do not depend on which rank or worker reads a sample;
4. captions are tokenised with the model's tokenizer and samples are batched.

Broken samples (undecodable images, unreadable captions, damaged tar records) are skipped and
counted; a shard that ends before the samples the plan counts for it (a tar cut short) is reported
in the next batch (``short``), so the trainer can say how many samples were lost and where. A training pass owes each worker's planned number of full batches (its samples // batch
size): a worker short of them because of broken samples tops up by reading its shards again (a new
shuffle round), so the planned steps still run. Each training batch carries its worker and the
position of that worker's record stream after it; a checkpoint stores the positions, and a resumed
pass skips that many records per worker before decoding anything. The trainer consumes training
batches in a canonical order (:func:`canonical_order`: one batch per worker in turn, skipping
workers that are done), reordered from the loader's where they differ (after a resume), so a
resumed run trains on the same batches in the same order as an uninterrupted one.

The extraction pass sees each sample as the reference's does (``extraction_transform = "train"``):
one view through the run's training transform (the crop in the workers, the photometric half on the
device with per-sample parameters), seeded by (seed, episode, key) in a stream of its own, so that
the extraction view is not the training pass's view of the sample and a resumed run extracts the
same views. With ``"eval"`` it decodes in the workers and leaves the eval transform's resize of
square images (img2dataset's ``border``/``center_crop`` downloads) to the device, batched
(:func:`protoclip_cli.data.transforms.eval_batch`).

Batches are dicts: ``images`` (B, 3, H, W) uint8 (eval extraction: possibly at the stored size), ``tokens`` (B, L) int64, ``keys`` (B,) int64,
``broken`` (samples this worker skipped since its previous batch), ``short`` (only when a shard
ended early since then: its id, the records read and the records it holds), ``worker``, ``position``
(training), and ``augment`` (B, P) float32 where part of the augmentation runs on the device.

Why one module of ~410 lines: the worker side (the iterable dataset) and the trainer side
(:class:`EpisodeStream`) share the control block and the position format; transforms,
augmentation, shard reading, run keys and teacher rows live in their own modules.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from protoclip_cli.core.model import get_tokenizer
from protoclip_cli.data.shards import tar_records
from protoclip_cli.data.teacher_file import TeacherRows
from protoclip_cli.data.transforms import crop_transform, decode_image, device_augmentation, eval_batch

_SEED_MIX = 1_000_003
# Random views of a sample: the training pass's (view 0) and the extraction pass's (view 1).
TRAIN_VIEW, EXTRACTION_VIEW = 0, 1
# Shared control block: [episode, train, then per worker: records to skip, batches already given].
_EPISODE, _TRAIN, _WORKERS_AT = 0, 1, 2


# -- the split of an episode's shards, and the canonical batch order ------------------------------


def split_for_rank(shards: list, rank: int, world_size: int) -> list:
    return shards[rank::world_size]


def split_for_worker(shards: list, worker: int, workers: int) -> list:
    return shards[worker::max(1, workers)]


def worker_batches(counts: dict[str, int], rank_shards: list[str], workers: int, batch_size: int) -> list[int]:
    """Full batches each data-loader worker of a rank owes a training pass (partial batches are dropped)."""
    return [
        sum(counts[s] for s in split_for_worker(rank_shards, w, workers)) // batch_size for w in range(max(1, workers))
    ]


def canonical_order(per_worker: list[int]) -> Iterator[int]:
    """The worker of each batch of a training pass: one from each worker in turn, skipping the done.

    This is the order a DataLoader over an IterableDataset delivers when every worker yields its
    batches; the trainer enforces it (:func:`in_canonical_order`) so it holds after a resume too.
    """
    remaining = list(per_worker)
    while any(remaining):
        for worker, left in enumerate(remaining):
            if left:
                remaining[worker] -= 1
                yield worker


def batches_to_skip(per_worker: list[int], done: int) -> list[int]:
    """How many of its batches each worker has given after ``done`` batches in canonical order."""
    given = [0] * len(per_worker)
    for index, worker in enumerate(canonical_order(per_worker)):
        if index >= done:
            break
        given[worker] += 1
    return given


def in_canonical_order(batches: Iterable[dict], per_worker: list[int], done: int) -> Iterator[dict]:
    """Yield ``batches`` (each naming its ``worker``) in canonical order, from the ``done``-th on.

    Batches that arrive early wait in a buffer (at most one per worker in practice). A worker that
    stops short of its planned batches ends the pass (the caller sees fewer batches than planned).
    """
    waiting: dict[int, list[dict]] = {}
    source = iter(batches)
    order = list(canonical_order(per_worker))[done:]
    for worker in order:
        while not waiting.get(worker):
            batch = next(source, None)
            if batch is None:
                return
            waiting.setdefault(int(batch["worker"]), []).append(batch)
        yield waiting[worker].pop(0)


# -- records --------------------------------------------------------------------------------------


def _records(urls: list[str], errors: list[int], expected: dict[str, int] | None = None,
             short: list[tuple[str, int, int]] | None = None) -> Iterator[dict]:
    """The records of ``urls`` in order; a damaged tar record is skipped and counted in ``errors[0]``
    (a shard that cannot be read at all raises its one sentence: ``data/remote.py``).

    A shard that ends before the ``expected`` records of its url (a tar cut short: everything after
    the cut is lost, which no per-record count shows) is reported in ``short`` as (url, records
    read, expected)."""

    def count(exception: Exception) -> bool:
        errors[0] += 1
        return True  # continue with the next record (webdataset's own handlers also sleep and warn)

    for url in urls:  # one at a time, to see where each one ends
        read = 0
        for record in tar_records([url], handler=count):
            read += 1
            yield record
        if expected is not None and short is not None and read < expected.get(url, 0):
            short.append((url, read, expected[url]))


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


@dataclass(frozen=True)
class StreamConfig:
    """What one rank's loader reads over a run, and how it turns samples into batches."""

    episodes: list[list[Path | str]]  # this rank's shards (paths or URLs) of every episode, in reading order
    counts: dict[str, int]  # shard id -> samples
    batch_size: int
    extract_batch_size: int
    image_size: int | tuple[int, int]
    tokenizer_arch: str
    augmentation: str = "none"
    seed: int = 0
    rank: int = 0
    shuffle_buffer: int = 0
    workers: int = 0  # data-loader worker processes (0: read in the training process)
    # Teacher HDF5 files, one per data set in data.datasets order: training batches also carry each
    # sample's teacher features.
    teacher_paths: tuple[str, ...] = ()
    # Several data sets: each shard's id in ``counts`` (default: its file name) and the offset added to
    # its img2dataset keys (default 0), both by the shard's path (``protoclip_cli.data.sources``).
    shard_ids: dict[str, str] = field(default_factory=dict)
    key_offsets: dict[str, int] = field(default_factory=dict)
    # The extraction pass's images: "train" = one augmented view (the reference), "eval" = centre crops.
    extraction_transform: str = "eval"

    def shard_id(self, path: Path | str) -> str:
        return self.shard_ids.get(str(path), Path(path).name)

    def owed(self, episode: int) -> list[int]:
        """Full batches each worker gives in the episode's training pass."""
        names = [self.shard_id(p) for p in self.episodes[episode]]
        return worker_batches(self.counts, names, self.workers, self.batch_size)


@dataclass(frozen=True)
class Position:
    """Where each worker of a training pass stands: records read and batches given."""

    records: tuple[int, ...]
    batches: tuple[int, ...]

    @classmethod
    def start(cls, workers: int) -> "Position":
        return cls((0,) * max(1, workers), (0,) * max(1, workers))

    def advanced(self, batch: dict) -> "Position":
        worker = int(batch["worker"])
        records, batches = list(self.records), list(self.batches)
        records[worker] = int(batch["position"])
        batches[worker] += 1
        return Position(tuple(records), tuple(batches))

    def to_json(self) -> dict:
        return {"records": list(self.records), "batches": list(self.batches)}

    @classmethod
    def from_json(cls, data: dict) -> "Position":
        return cls(tuple(int(v) for v in data["records"]), tuple(int(v) for v in data["batches"]))


class EpisodeDataset(IterableDataset):
    """The batches of one worker for the pass the shared ``control`` block names."""

    def __init__(self, config: StreamConfig, control: torch.Tensor):
        super().__init__()
        self.config = config
        self.control = control
        self._ready = False

    def _setup(self) -> None:
        cfg = self.config
        self._crop = crop_transform(cfg.augmentation, cfg.image_size)
        self._device_augmentation = device_augmentation(cfg.augmentation, cfg.image_size)
        self._tokenizer = get_tokenizer(cfg.tokenizer_arch)
        self._teacher = TeacherRows(cfg.teacher_paths) if cfg.teacher_paths else None
        self._ready = True

    def __iter__(self) -> Iterator[dict]:
        if not self._ready:
            self._setup()
        info = get_worker_info()
        worker = info.id if info is not None else 0
        control = self.control.tolist()
        episode, train = control[_EPISODE], bool(control[_TRAIN])
        skip_records = control[_WORKERS_AT + 2 * worker]
        given = control[_WORKERS_AT + 2 * worker + 1]
        cfg = self.config
        urls = [str(p) for p in split_for_worker(cfg.episodes[episode], worker, cfg.workers)]
        if not urls:
            return iter(())
        if train:
            return self._training(episode, worker, urls, skip_records, given)
        return self._extraction(episode, worker, urls)

    # -- passes ------------------------------------------------------------------------------------
    def _extraction(self, episode: int, worker: int, urls: list[str]) -> Iterator[dict]:
        if self.config.extraction_transform == "train":
            batcher = _Batcher(self, self.config.extract_batch_size, worker)
            transform = lambda image, key: self._augment(image, key, episode, EXTRACTION_VIEW)  # noqa: E731
        else:  # decode only: the eval resize of square images runs batched on the device (eval_batch)
            batcher = _Batcher(self, self.config.extract_batch_size, worker,
                               stack=lambda images: eval_batch(images, self.config.image_size))
            transform = lambda image, key: (image, None)  # noqa: E731
        for record in _records(urls, batcher.tar_errors, self._expected(urls), batcher.short):
            sample = self._sample(record, transform)
            if (batch := batcher.add(sample, None)) is not None:
                yield batch
        if (batch := batcher.flush()) is not None:
            yield batch

    def _training(self, episode: int, worker: int, urls: list[str], skip_records: int, given: int) -> Iterator[dict]:
        cfg = self.config
        owed = cfg.owed(episode)[worker]
        batcher = _Batcher(self, cfg.batch_size, worker, teacher=self._teacher)
        position = 0
        round_index = 0
        while given < owed:
            good_in_round = 0
            rng = random.Random(((cfg.seed * _SEED_MIX + episode) * _SEED_MIX + cfg.rank * 1000 + worker) * _SEED_MIX + round_index)
            records = _records(urls, batcher.tar_errors, self._expected(urls), batcher.short)
            for record in shuffled(records, cfg.shuffle_buffer, rng):
                position += 1
                if position <= skip_records:
                    good_in_round += 1  # read before the resume: assume it was good (it was counted then)
                    continue
                sample = self._sample(record, lambda image, key: self._augment(image, key, episode, TRAIN_VIEW))
                good_in_round += sample is not None
                if (batch := batcher.add(sample, position)) is not None:
                    yield batch
                    given += 1
                    if given >= owed:
                        return
            if good_in_round == 0:
                return  # nothing decodes in these shards: the trainer reports the shortfall
            round_index += 1

    def _expected(self, urls: list[str]) -> dict[str, int]:
        """The records each shard holds by the plan (img2dataset's count of its samples)."""
        return {url: self.config.counts.get(self.config.shard_id(Path(url)), 0) for url in urls}

    # -- samples -----------------------------------------------------------------------------------
    def _sample(self, record: dict, transform: Callable) -> tuple | None:
        """(image, params, caption, key) of a record, or None when anything in it is broken."""
        try:
            key = int(record["__key__"].rsplit("/", 1)[-1]) + self.config.key_offsets.get(record.get("__url__", ""), 0)
            caption = record["txt"].decode("utf-8")
            image, params = transform(decode_image(record["jpg"]), key)
        except Exception:  # a broken sample is skipped and counted, never fatal
            return None
        return image, params, caption, key

    def _augment(self, image: torch.Tensor, key: int, episode: int, view: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The augmentation of a sample is a function of (seed, episode, key, view) only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.config.seed, episode, key, view))
            image = self._crop(image)
            params = self._device_augmentation.draw() if self._device_augmentation is not None else None
        return image, params


def view_seed(seed: int, episode: int, key: int, view: int) -> int:
    """The seed of one random view of a sample (modulo 2**64, torch's seed range, which leaves every
    seed of one data set's keys as it was). The training view's formula predates the extraction
    view, which mixes the view in once more, so training runs repeat their earlier augmentations."""
    mixed = (seed * _SEED_MIX + episode) * _SEED_MIX + key
    if view != TRAIN_VIEW:
        mixed = mixed * _SEED_MIX + view
    return mixed % (1 << 64)


class _Batcher:
    """Collects samples of one worker into batches; counts the broken ones in between."""

    def __init__(self, dataset: EpisodeDataset, batch_size: int, worker: int, teacher: "TeacherRows | None" = None,
                 stack: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack):
        self.dataset, self.batch_size, self.worker, self.teacher, self.stack = dataset, batch_size, worker, teacher, stack
        self.samples: list[tuple] = []
        self.broken = 0
        self.tar_errors = [0]  # damaged tar records, counted by the record reader
        self.short: list[tuple[str, int, int]] = []  # shards that ended early, reported by the record reader

    def add(self, sample: tuple | None, position: int | None) -> dict | None:
        if sample is None:
            self.broken += 1
            return None
        self.samples.append(sample)
        if len(self.samples) < self.batch_size:
            return None
        return self._batch(position)

    def flush(self) -> dict | None:
        return self._batch(None) if self.samples else None

    def _batch(self, position: int | None) -> dict:
        images, params, captions, keys = zip(*self.samples)
        batch = {
            "images": self.stack(list(images)),
            "tokens": self.dataset._tokenizer(list(captions)),
            "keys": torch.tensor(keys, dtype=torch.int64),
            "broken": self.broken + self.tar_errors[0],
            "worker": self.worker,
        }
        if position is not None:
            batch["position"] = position
        if self.short:
            # (shard id, records read, records it holds) of each shard that ended early since the last batch
            batch["short"] = [(self.dataset.config.shard_id(Path(url)), read, held) for url, read, held in self.short]
            self.short = []
        if params[0] is not None:
            batch["augment"] = torch.stack(params)
        if self.teacher is not None:
            batch["teacher"] = self.teacher.rows(batch["keys"])
        self.samples, self.broken, self.tar_errors[0] = [], 0, 0
        return batch


class EpisodeStream:
    """One rank's passes over a run's episodes, served by one DataLoader with persistent workers."""

    def __init__(self, config: StreamConfig, pin_memory: bool = False, worker_init: Callable[[int], None] | None = None):
        """``worker_init`` runs in each worker process as it starts (the trainer's signal policy)."""
        self.config = config
        self.control = torch.zeros(_WORKERS_AT + 2 * max(1, config.workers), dtype=torch.int64).share_memory_()
        self.loader = DataLoader(
            EpisodeDataset(config, self.control),
            batch_size=None,
            num_workers=config.workers,
            pin_memory=pin_memory,
            persistent_workers=config.workers > 0,
            prefetch_factor=4 if config.workers > 0 else None,
            worker_init_fn=worker_init,
        )

    def close(self) -> None:
        """Stop the workers now. They are persistent, so nothing else stops them before garbage
        collection; until then a process that forks (evaluation's own loader, a notebook's next
        call) copies this live iterator into its children, whose exit then tries to stop workers
        that are not theirs ("Exception ignored ... can only test a child process")."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def __enter__(self) -> "EpisodeStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self, episode: int, train: bool, position: Position | None) -> Iterator[dict]:
        position = position or Position.start(self.config.workers)
        values = [episode, int(train)]
        for records, given in zip(position.records, position.batches):
            values += [records, given]
        self.control.copy_(torch.tensor(values, dtype=torch.int64))
        return iter(self.loader)  # workers start reading (and prefetching) now

    def extraction(self, episode: int) -> Iterator[dict]:
        """Every decodable sample of this rank's share of ``episode`` (``extraction_transform``), once."""
        return self._start(episode, False, None)

    def training(self, episode: int, position: Position | None = None) -> Iterator[dict]:
        """The training batches of ``episode`` in canonical order, resuming after ``position``."""
        position = position or Position.start(self.config.workers)
        batches = self._start(episode, True, position)
        return in_canonical_order(batches, self.config.owed(episode), sum(position.batches))

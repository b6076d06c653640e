"""Batched feature extraction with progress, cached per model checkpoint and data set.

Cache files live in one folder per model (``runs/<run>/eval/cache/``); a file's name carries a
hash of the checkpoint's identity and of the data (paths, sizes, modification times), so a new
checkpoint or changed data never reuses stale features, and several tasks on the same data share
one extraction.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from protoclip_cli.artifacts import atomic_path
from protoclip_cli.console import progress, warn
from protoclip_cli.data.transforms import eval_transform
from protoclip_cli.errors import WriteError
from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.tasks.model import EvalModel

TEXT_BATCH = 256


def _cache_file(cache_dir: Path | None, model: EvalModel, label: str, *identity: object) -> Path | None:
    if cache_dir is None:
        return None
    digest = hashlib.sha256("\n".join([model.fingerprint, str(model.image_size), *map(str, identity)]).encode())
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
    return cache_dir / f"{safe}.{digest.hexdigest()[:16]}.pt"


def _load(path: Path | None, rows: int) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    features = torch.load(path, map_location="cpu", weights_only=True)["features"]
    return features if features.shape[0] == rows else None


def _save(path: Path | None, features: torch.Tensor, model: EvalModel, label: str) -> None:
    if path is None:
        return
    try:
        with atomic_path(path) as tmp:
            torch.save({"features": features, "model": model.name, "data": label}, tmp)
    except WriteError as exc:  # the cache only saves time: evaluate on without it
        warn(f"{exc} The features are not cached (--no-cache skips the cache).")


def _rate(done: int, started: float, unit: str) -> str:
    return f"{done / max(time.perf_counter() - started, 1e-9):.0f} {unit}/s"


def image_features(
    model: EvalModel,
    images: ImageSet,
    cache_dir: Path | None = None,
    batch_size: int = 256,
    workers: int = 0,
    normalized: bool = True,
) -> torch.Tensor:
    """(N, D) float32 image features of ``images`` in row order (cached): L2-normalised, or the raw
    image tower outputs with ``normalized=False``."""
    label = f"{images.name}-image" if normalized else f"{images.name}-image-raw"
    cache = _cache_file(cache_dir, model, label, images.fingerprint)
    cached = _load(cache, images.size)
    if cached is not None:
        return cached
    dataset = images.images(eval_transform(model.image_size))
    if isinstance(dataset, IterableDataset):
        workers = min(workers, images.details.get("shards", 1))
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=model.device.type == "cuda",
        persistent_workers=False,
    )
    features: torch.Tensor | None = None
    filled = torch.zeros(images.size, dtype=torch.bool)
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"image features {images.name}", total=images.size, rate="")
        for rows, batch in loader:
            encoded = model.encode_images(batch, normalized=normalized)
            if features is None:
                features = torch.empty(images.size, encoded.shape[1], dtype=torch.float32)
            features[rows] = encoded
            filled[rows] = True
            bar.update(task, advance=len(rows), rate=_rate(int(filled.sum()), started, "img"))
    if features is None or not bool(filled.all()):
        raise RuntimeError(f"extraction of {images.name} produced {int(filled.sum())} of {images.size} images")
    _save(cache, features, model, images.name)
    return features


def pair_features(
    model: EvalModel, data: ImageSet, cache_dir: Path | None, batch_size: int, workers: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, caption features, index of each caption's image) of a set of image-text
    pairs: what retrieval and the modality gap measure."""
    texts, owners = data.caption_owners()
    images = image_features(model, data, cache_dir, batch_size, workers)
    captions = text_features(model, texts, f"{data.name}-captions", cache_dir)
    return images, captions, owners


def text_features(
    model: EvalModel,
    texts: Sequence[str],
    label: str,
    cache_dir: Path | None = None,
    batch_size: int = TEXT_BATCH,
) -> torch.Tensor:
    """(n, D) float32 normalised text features of ``texts`` (cached under ``label``)."""
    cache = _cache_file(cache_dir, model, f"{label}-text", *texts)
    cached = _load(cache, len(texts))
    if cached is not None:
        return cached
    parts = []
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"text features {label}", total=len(texts), rate="")
        for start in range(0, len(texts), batch_size):
            parts.append(model.encode_texts(list(texts[start : start + batch_size])))
            bar.update(task, advance=len(parts[-1]), rate=_rate(start + len(parts[-1]), started, "txt"))
    features = torch.cat(parts) if parts else torch.empty(0, 0)
    _save(cache, features, model, label)
    return features

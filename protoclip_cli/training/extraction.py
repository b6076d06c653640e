"""The extraction pass of an episode: projected features of every sample of this rank, by key."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch

from protoclip_cli.data.transforms import to_model_input


def extract_features(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    channels_last: bool = False,
    on_batch: Callable[[int, float], None] | None = None,
    forward: Callable | None = None,
    pad_to: int | None = None,
    augmentation=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Run ``model`` (eval mode, inference mode) over ``batches`` (uint8 images: cropped training
    views, eval-transformed images, or squares the device resizes to the model's size).

    Returns ``(keys, {"image": (n, d), "text": (n, d)}, broken)``: L2-normalised projected features
    in float32 on ``device``, aligned with ``keys`` (int64, CPU), and the count of undecodable samples.
    ``forward`` replaces ``model`` for the forward pass (a compiled copy); ``pad_to`` pads a smaller
    last batch to that size (repeating its last sample, outputs dropped) so a compiled forward sees
    one shape. ``augmentation`` is the device half of the training transform, applied with each
    batch's ``augment`` parameters (the reference's extraction sees training views, pipeline.py).
    ``on_batch(samples, seconds)`` is called after each batch (progress).
    """
    forward = forward or model
    was_training = model.training
    model.eval()
    keys: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    broken = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                start = time.perf_counter()
                count = len(batch["keys"])
                pixels, tokens = batch["images"], batch["tokens"]
                params = batch.get("augment") if augmentation is not None else None
                if pad_to is not None and count < pad_to:
                    fill = pad_to - count

                    def pad(t: torch.Tensor) -> torch.Tensor:
                        return torch.cat([t, t[-1:].expand(fill, *t.shape[1:])])

                    pixels, tokens = pad(pixels), pad(tokens)
                    params = pad(params) if params is not None else None
                pixels = to_model_input(pixels, model.image_mean, model.image_std, device,
                                        augmentation if params is not None else None, params,
                                        channels_last=channels_last, size=model.image_size)
                with autocast():
                    outputs = forward(pixels, tokens.to(device, non_blocking=True))
                images.append(outputs["image_proj"][:count].float())
                texts.append(outputs["text_proj"][:count].float())
                keys.append(batch["keys"])
                broken += int(batch["broken"])
                if on_batch is not None:
                    on_batch(count, time.perf_counter() - start)
    finally:
        model.train(was_training)
    if not keys:
        empty = torch.zeros((0, 0), device=device)
        return torch.zeros(0, dtype=torch.int64), {"image": empty, "text": empty}, broken
    # Outside inference mode: the features feed k-means and back-translation as ordinary tensors.
    return torch.cat(keys), {"image": torch.cat(images), "text": torch.cat(texts)}, broken

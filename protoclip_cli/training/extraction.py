"""The extraction pass of an episode: projected features of every sample of this rank, by key."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from protoclip_cli.data.pipeline import LoaderSpec, make_loader


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    spec: LoaderSpec,
    workers: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    channels_last: bool = False,
    on_batch: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Run ``model`` (eval mode, eval transforms, no grad) over this rank's episode shards.

    Returns ``(keys, {"image": (n, d), "text": (n, d)}, broken)``: L2-normalised projected features
    in float32 on ``device``, aligned with ``keys`` (int64, CPU), and the count of undecodable samples.
    ``on_batch(samples, seconds)`` is called after each batch (progress).
    """
    from protoclip_cli.data.transforms import normalize

    was_training = model.training
    model.eval()
    keys: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    broken = 0
    try:
        for batch in make_loader(spec, workers, pin_memory=device.type == "cuda"):
            start = time.perf_counter()
            pixels = normalize(batch["images"], model.image_mean, model.image_std, device, channels_last=channels_last)
            tokens = batch["tokens"].to(device, non_blocking=True)
            with autocast():
                outputs = model(pixels, tokens)
            images.append(outputs["image_proj"].float())
            texts.append(outputs["text_proj"].float())
            keys.append(batch["keys"])
            broken += int(batch["broken"])
            if on_batch is not None:
                on_batch(len(batch["keys"]), time.perf_counter() - start)
    finally:
        model.train(was_training)
    if not keys:
        empty = torch.zeros((0, 0), device=device)
        return torch.zeros(0, dtype=torch.int64), {"image": empty, "text": empty}, broken
    return torch.cat(keys), {"image": torch.cat(images), "text": torch.cat(texts)}, broken

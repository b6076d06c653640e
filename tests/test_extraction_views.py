"""What the extraction pass sees (``proto.extraction_transform``): one training view of each sample,
as the reference's extraction loop reads its training data, or resized centre crops ("eval")."""

from __future__ import annotations

import torch

from protoclip_cli.data.augment import PARAMS
from protoclip_cli.data.pipeline import EXTRACTION_VIEW, TRAIN_VIEW, EpisodeStream, StreamConfig, view_seed
from protoclip_cli.data.shards import iter_samples
from protoclip_cli.data.transforms import crop_transform, decode_image, device_augmentation, eval_batch

SIZE = 64


def _stream(workspace, augmentation: str, extraction: str, workers: int = 0) -> EpisodeStream:
    shards = sorted(workspace.split_dir("synthetic").glob("*.tar"))
    counts = {p.name: 128 for p in shards}
    return EpisodeStream(StreamConfig(
        episodes=[shards, shards], counts=counts, batch_size=32, extract_batch_size=100, image_size=SIZE,
        tokenizer_arch="protoclip-tiny", augmentation=augmentation, seed=5, workers=workers,
        extraction_transform=extraction,
    ))


def _decoded(workspace) -> dict[int, torch.Tensor]:
    shards = sorted(workspace.split_dir("synthetic").glob("*.tar"))
    return {sample.key: decode_image(sample.image) for sample in iter_samples(shards, meta=False)}


def _view(image: torch.Tensor, augmentation: str, key: int, episode: int, view: int):
    """A sample's view as the workers make it, computed here from its seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(5, episode, key, view))
        cropped = crop_transform(augmentation, SIZE)(image)
        light = device_augmentation(augmentation, SIZE)
        return cropped, (light.draw() if light is not None else None)


def test_train_extraction_sees_one_training_view_per_sample_with_the_reference_frequencies(synthetic_workspace):
    decoded = _decoded(synthetic_workspace)
    batches = list(_stream(synthetic_workspace, "light", "train").extraction(1))
    keys = torch.cat([b["keys"] for b in batches]).tolist()
    assert sorted(keys) == sorted(decoded)  # every sample once
    images = torch.cat([b["images"] for b in batches])
    params = torch.cat([b["augment"] for b in batches])
    assert images.shape[-2:] == (SIZE, SIZE)
    for row in (0, 77, len(keys) - 1):  # the crop and the photometric parameters of the extraction view
        cropped, drawn = _view(decoded[keys[row]], "light", keys[row], 1, EXTRACTION_VIEW)
        assert torch.equal(images[row], cropped) and torch.equal(params[row], drawn)
    # Not the training pass's view of the sample: a stream of its own.
    training_view, _ = _view(decoded[keys[0]], "light", keys[0], 1, TRAIN_VIEW)
    assert not torch.equal(images[0], training_view)
    # The reference's frequencies: flip 0.5, jitter, grayscale and blur 0.2 (512 samples: 4 standard errors).
    for name, p in (("flip", 0.5), ("jitter", 0.2), ("gray", 0.2), ("blur", 0.2)):
        rate = float(params[:, PARAMS.index(name)].mean())
        assert abs(rate - p) < 4 * (p * (1 - p) / len(keys)) ** 0.5, (name, rate)
    # The crops are random: views of one sample differ from episode to episode.
    again = list(_stream(synthetic_workspace, "light", "train").extraction(0))
    first = {int(k): image for b in again for k, image in zip(b["keys"], b["images"])}
    assert not torch.equal(first[keys[0]], images[0])


def test_train_extraction_views_repeat_with_workers(synthetic_workspace):
    """A resumed run extracts the same views: they depend on (seed, episode, key) only, not on the worker."""
    alone = {int(k): image for b in _stream(synthetic_workspace, "rrc", "train").extraction(0)
             for k, image in zip(b["keys"], b["images"])}
    with_workers = {int(k): image for b in _stream(synthetic_workspace, "rrc", "train", workers=2).extraction(0)
                    for k, image in zip(b["keys"], b["images"])}
    assert alone.keys() == with_workers.keys()
    assert all(torch.equal(alone[k], with_workers[k]) for k in alone)


def test_eval_extraction_is_the_decoded_image_left_for_the_device_resize(synthetic_workspace):
    decoded = _decoded(synthetic_workspace)
    batches = list(_stream(synthetic_workspace, "light", "eval").extraction(0))
    assert all("augment" not in b for b in batches)
    for batch in batches[:2]:
        expected = eval_batch([decoded[int(k)] for k in batch["keys"]], SIZE)
        assert torch.equal(batch["images"], expected)

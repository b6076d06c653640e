"""Decoding, uint8 augmentation and on-device normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png
from torchvision.transforms import v2

from protoclip_cli.data.transforms import (
    blur_kernel_size,
    decode_image,
    eval_transform,
    normalize,
    train_transform,
)

torch.set_num_threads(1)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _smooth_image(height: int, width: int) -> torch.Tensor:
    """A gradient image: JPEG keeps it within a few grey levels."""
    ys = torch.linspace(0, 1, height).view(-1, 1)
    xs = torch.linspace(0, 1, width).view(1, -1)
    channels = [ys * 200 + 20 + 0 * xs, xs * 180 + 40 + 0 * ys, (ys + xs) * 100 + 10]
    return torch.stack(channels).round().to(torch.uint8)


def test_decode_jpeg_gives_rgb_uint8_close_to_the_source():
    image = _smooth_image(48, 80)
    decoded = decode_image(encode_jpeg(image, quality=95).numpy().tobytes())
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 48, 80)
    assert (decoded.int() - image.int()).abs().float().mean() < 3


def test_decode_grayscale_jpeg_and_png_give_three_channels():
    gray = _smooth_image(32, 40)[:1]
    decoded = decode_image(encode_jpeg(gray).numpy().tobytes())
    assert decoded.shape == (3, 32, 40)
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[1], decoded[2])
    image = _smooth_image(20, 30)
    assert torch.equal(decode_image(encode_png(image).numpy().tobytes()), image)


@pytest.mark.parametrize("kind", ["none", "rrc", "light"])
def test_train_transforms_give_uint8_at_the_model_size(kind):
    torch.manual_seed(0)
    transform = train_transform(kind, 64)
    for _ in range(5):
        out = transform(_smooth_image(90, 130))
        assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)


def test_rrc_and_light_crop_scales_follow_the_reference():
    rrc = train_transform("rrc", 224).transforms[0]
    light = train_transform("light", 224).transforms
    assert isinstance(rrc, v2.RandomResizedCrop) and rrc.scale == (0.9, 1.0)
    assert isinstance(light[0], v2.RandomResizedCrop) and light[0].scale == (0.5, 1.0)
    blur = light[-1].transforms[0]
    assert isinstance(blur, v2.GaussianBlur) and list(blur.kernel_size) == [21, 21]
    assert light[-1].p == pytest.approx(0.2)


def test_light_augmentation_is_random():
    torch.manual_seed(1)
    image = _smooth_image(64, 64)
    light = train_transform("light", 64)
    outputs = {light(image).numpy().tobytes() for _ in range(8)}
    assert len(outputs) > 1


def test_blur_kernel_scales_with_image_size():
    assert blur_kernel_size(224) == 21
    assert blur_kernel_size(64) == 7  # 21 * 64 / 224 = 6, rounded up to odd
    assert blur_kernel_size(16) == 3
    assert blur_kernel_size((448, 300)) == 29  # from the shorter side: 21 * 300 / 224 = 28.1


def test_eval_transform_resizes_the_shorter_side_and_centre_crops():
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    out = eval_transform(64)(image)
    assert torch.equal(out, image[:, :, 16:80])  # shorter side already 64: a pure centre crop
    big = eval_transform(32)(torch.randint(0, 256, (3, 100, 50), dtype=torch.uint8))
    assert big.shape == (3, 32, 32) and big.dtype == torch.uint8


def test_unknown_augmentation_names_the_choices():
    with pytest.raises(ValueError, match="none, rrc, light"):
        train_transform("heavy", 64)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_matches_the_formula(channels_last):
    batch = torch.randint(0, 256, (4, 3, 8, 10), dtype=torch.uint8)
    out = normalize(batch, MEAN, STD, "cpu", channels_last=channels_last)
    expected = (batch.numpy().astype(np.float64) / 255 - np.array(MEAN).reshape(1, 3, 1, 1)) / np.array(STD).reshape(
        1, 3, 1, 1
    )
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_normalize_rejects_float_batches():
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(2, 3, 4, 4), MEAN, STD, "cpu")

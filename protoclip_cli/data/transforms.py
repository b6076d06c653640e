"""Image decoding and augmentation on uint8 tensors; float conversion happens on the device.

Data-loader workers decode JPEGs with ``torchvision.io.decode_jpeg`` and crop/augment uint8
tensors with ``torchvision.transforms.v2``; batches travel as uint8 (4x less to copy) and become
normalised floats only on the training device (:func:`normalize`). Resampling is bicubic with
antialiasing, as in the reference implementation.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torchvision.io import ImageReadMode, decode_image as _decode_any, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

Augmentation = Literal["none", "rrc", "light"]
AUGMENTATIONS: tuple[str, ...] = ("none", "rrc", "light")
_JPEG_MAGIC = b"\xff\xd8"
_BICUBIC = InterpolationMode.BICUBIC
# The reference blurs 224 px images with a 21-pixel kernel and sigma in [0.1, 2]; both scale with the image.
_REFERENCE_SIZE = 224
_REFERENCE_BLUR_KERNEL = 21
_REFERENCE_BLUR_SIGMA = (0.1, 2.0)


def decode_image(jpeg_bytes: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode an encoded image to an RGB uint8 tensor of shape (3, H, W).

    JPEG goes through ``decode_jpeg``; other formats (PNG, WebP, ...) through torchvision's
    generic decoder, so a data set written with another ``encode_format`` still loads.
    """
    data = torch.frombuffer(bytearray(jpeg_bytes), dtype=torch.uint8)
    if bytes(jpeg_bytes[:2]) == _JPEG_MAGIC:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    return _decode_any(data, mode=ImageReadMode.RGB)


def _size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def blur_kernel_size(image_size: int | Sequence[int]) -> int:
    """The reference's 21-pixel blur kernel at 224 px, scaled to ``image_size`` (odd, at least 3)."""
    side = min(_size_pair(image_size))
    kernel = round(_REFERENCE_BLUR_KERNEL * side / _REFERENCE_SIZE)
    kernel = max(3, kernel)
    return kernel if kernel % 2 == 1 else kernel + 1


def eval_transform(image_size: int | Sequence[int]) -> v2.Compose:
    """Resize the shorter side to the model's size, then centre-crop (uint8 in, uint8 out)."""
    size = _size_pair(image_size)
    return v2.Compose(
        [v2.Resize(min(size), interpolation=_BICUBIC, antialias=True), v2.CenterCrop(size)]
    )


def train_transform(kind: Augmentation, image_size: int | Sequence[int]) -> v2.Compose:
    """Training augmentation on uint8 tensors.

    ``none``: the eval transform; ``rrc``: RandomResizedCrop(scale 0.9-1) (reference CLIP);
    ``light``: RRC(scale 0.5-1), horizontal flip, colour jitter (0.8, 0.8, 0.8, 0.2) with p=0.2,
    grayscale with p=0.2 and Gaussian blur with p=0.2 (reference ProtoCLIP).
    """
    size = _size_pair(image_size)
    if kind == "none":
        return eval_transform(size)
    if kind == "rrc":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=_BICUBIC, antialias=True)])
    if kind == "light":
        scale = min(size) / _REFERENCE_SIZE
        sigma = tuple(s * scale for s in _REFERENCE_BLUR_SIGMA)
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=_BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.2),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=sigma)], p=0.2),
            ]
        )
    raise ValueError(f"Unknown augmentation '{kind}'; choose one of {', '.join(AUGMENTATIONS)}.")


def normalize(
    batch_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    channels_last: bool = False,
) -> torch.Tensor:
    """Move a uint8 (B, 3, H, W) batch to ``device`` and return ``(x / 255 - mean) / std`` in float32."""
    if batch_uint8.dtype != torch.uint8 or batch_uint8.dim() != 4:
        raise ValueError(f"normalize expects a uint8 (B, C, H, W) batch, got {batch_uint8.dtype} {tuple(batch_uint8.shape)}.")
    device = torch.device(device)
    batch = batch_uint8.to(device, non_blocking=batch_uint8.is_pinned())
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    # One fused multiply-add: x * (1 / (255 std)) - mean / std.
    images = torch.addcmul(-mean_t / std_t, batch.float(), 1 / (255 * std_t))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images

"""Image decoding, cropping and augmentation on uint8 tensors; float conversion happens on the device.

Data-loader workers decode JPEGs with ``torchvision.io.decode_jpeg`` and crop/resize uint8 tensors
with ``torchvision.transforms.v2`` (:func:`crop_transform`); batches travel as uint8 (4x less to
copy) and become floats only on the training device (:func:`normalize`), where the photometric
part of the ``light`` augmentation runs batched (:mod:`protoclip_cli.data.augment`).
:func:`train_transform` is the whole per-image torchvision pipeline of each augmentation, the
reference the split pipeline is checked against. Resampling is bicubic with antialiasing, as in
the reference implementation.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torchvision.io import ImageReadMode, decode_image as _decode_any, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from protoclip_cli.data.augment import LightAugmentation, blur_kernel_size

__all__ = [
    "AUGMENTATIONS", "blur_kernel_size", "crop_transform", "decode_image", "device_augmentation", "eval_transform",
    "eval_batch", "normalize", "resize_square",
    "to_model_input", "train_transform",
]

Augmentation = Literal["none", "rrc", "light"]
AUGMENTATIONS: tuple[str, ...] = ("none", "rrc", "light")
_JPEG_MAGIC = b"\xff\xd8"
_BICUBIC = InterpolationMode.BICUBIC
# RandomResizedCrop scales: the reference CLIP recipe's and the reference ProtoCLIP "light" one's.
_CROP_SCALE = {"rrc": (0.9, 1.0), "light": (0.5, 1.0)}


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


def eval_transform(image_size: int | Sequence[int]) -> v2.Compose:
    """Resize the shorter side to the model's size, then centre-crop (uint8 in, uint8 out)."""
    size = _size_pair(image_size)
    return v2.Compose(
        [v2.Resize(min(size), interpolation=_BICUBIC, antialias=True), v2.CenterCrop(size)]
    )


def eval_batch(images: list[torch.Tensor], image_size: int | Sequence[int]) -> torch.Tensor:
    """Decoded images of an extraction batch, stacked: as they are when all are squares of one side
    at least the model's (img2dataset's ``border`` and ``center_crop`` downloads), for the device to
    resize (:func:`to_model_input`); otherwise each through :func:`eval_transform` here."""
    first = images[0].shape
    square = first[-1] == first[-2] and first[-1] >= max(_size_pair(image_size))
    if square and all(image.shape == first for image in images):
        return torch.stack(images)
    transform = eval_transform(image_size)
    return torch.stack([transform(image) for image in images])


def _check_kind(kind: str) -> None:
    if kind not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation '{kind}'; choose one of {', '.join(AUGMENTATIONS)}.")


def crop_transform(kind: Augmentation, image_size: int | Sequence[int]) -> v2.Compose:
    """What data-loader workers do to a training image: uint8 in, uint8 at the model's size out.

    ``none``: the eval transform; ``rrc``: RandomResizedCrop(scale 0.9-1) (reference CLIP), the whole
    augmentation; ``light``: RandomResizedCrop(scale 0.5-1), the rest runs on the device.
    """
    _check_kind(kind)
    size = _size_pair(image_size)
    if kind == "none":
        return eval_transform(size)
    return v2.Compose([v2.RandomResizedCrop(size, scale=_CROP_SCALE[kind], interpolation=_BICUBIC, antialias=True)])


def device_augmentation(kind: Augmentation, image_size: int | Sequence[int]) -> LightAugmentation | None:
    """The part of an augmentation that runs batched on the device (None: all of it runs in the workers)."""
    _check_kind(kind)
    return LightAugmentation.for_size(image_size) if kind == "light" else None


def train_transform(kind: Augmentation, image_size: int | Sequence[int]) -> v2.Compose:
    """The whole augmentation per image, as torchvision composes it (uint8 in, uint8 out).

    ``light`` is the reference's: RRC(scale 0.5-1), horizontal flip, colour jitter (0.8, 0.8, 0.8,
    0.2) with p=0.2, grayscale with p=0.2, Gaussian blur with p=0.2. Training does not call this:
    workers run :func:`crop_transform` and the device :mod:`protoclip_cli.data.augment`, which draw
    the same random parameters in the same order; tests and the loader benchmark compare against it.
    """
    crop = crop_transform(kind, image_size)
    light = device_augmentation(kind, image_size)
    if light is None:
        return crop
    return v2.Compose(
        [
            *crop.transforms,
            v2.RandomHorizontalFlip(light.flip_p),
            v2.RandomApply([v2.ColorJitter(light.brightness, light.contrast, light.saturation, light.hue)], p=light.jitter_p),
            v2.RandomGrayscale(p=light.gray_p),
            v2.RandomApply([v2.GaussianBlur(light.blur_kernel, sigma=light.blur_sigma)], p=light.blur_p),
        ]
    )


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


def resize_square(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Square float images (0-255 scale) to the model's size: what :func:`eval_transform` does to a
    square image (antialiased bicubic resize, the centre crop then takes everything), batched and
    without rounding to 8 bits; clamped to 0-255 as the uint8 path clamps."""
    height, width = _size_pair(size)
    resized = torch.nn.functional.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 255.0)


def to_model_input(
    batch_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    augmentation: LightAugmentation | None = None,
    params: torch.Tensor | None = None,
    channels_last: bool = False,
    size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """The model's input from a loader batch, on ``device``: :func:`normalize`, after the device
    augmentation when there is one (``params``: the batch's per-sample parameters, drawn by the
    workers) and after resizing square images to ``size`` when they are not at it yet (the
    extraction pass leaves that resize to the device, :mod:`protoclip_cli.data.pipeline`)."""
    resize = size is not None and tuple(batch_uint8.shape[-2:]) != _size_pair(size)
    if augmentation is None and not resize:
        return normalize(batch_uint8, mean, std, device, channels_last)
    if augmentation is not None and params is None:
        raise ValueError("The device augmentation needs the batch's per-sample parameters ('augment').")
    device = torch.device(device)
    images = batch_uint8.to(device, non_blocking=batch_uint8.is_pinned()).float()
    if resize:
        images = resize_square(images, size)
    images = images.div_(255.0)
    if augmentation is not None:
        images = augmentation.apply(images, params)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    images = images.sub_(mean_t).div_(std_t)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images

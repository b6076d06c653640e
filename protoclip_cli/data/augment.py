"""The photometric half of the ``light`` augmentation, batched on the training device.

The reference's ``light`` augmentation is, per image: RandomResizedCrop(scale 0.5-1), horizontal
flip (p 0.5), colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.2, grayscale with p 0.2 and a 21-pixel
Gaussian blur with p 0.2. Run per image on CPU workers it costs ~27 times the crop alone (the blur
~100 ms, the jitter ~12 ms an image), far more than a GPU trains. So it is split:

- data-loader workers decode, crop and resize (the crop box drawn per sample) and *draw* the
  photometric parameters of each sample: :meth:`LightAugmentation.draw`, called right after the
  crop in the same seeded random stream, makes exactly the draws torchvision's own transforms make,
  in the same order (``RandomHorizontalFlip``, ``RandomApply([ColorJitter])``, ``RandomGrayscale``,
  ``RandomApply([GaussianBlur])``), so a sample gets the parameters the per-image torchvision
  pipeline would give it with the same seed, and a resumed run the same as an uninterrupted one;
- the parameters travel with the uint8 batch as a small float tensor (:data:`PARAMS` columns) and
  :meth:`LightAugmentation.apply` applies them to the whole batch where the model runs (the same
  code on CPU when training on CPU): flips by index, the jitter's four operations in each sample's
  own random order, grayscale, and the blur as two 1-D convolutions with one kernel per sample.

The formulas are torchvision's float formulas (``torchvision.transforms.v2.functional``:
``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale``, ``gaussian_blur`` with reflect
padding), written for per-sample factors; tests check them against torchvision image by image.
The arithmetic stays in float32 from the uint8 crop to the normalised input, so, unlike the
reference's PIL pipeline, no rounding to 8 bits happens between operations. torchvision's
functional ops take one factor per call (one for the whole batch) and kornia would add a dependency
with its own random stream; drawing in the workers keeps the per-sample seeding this project's
resume relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

PARAMS: tuple[str, ...] = (
    "flip", "jitter", "brightness", "contrast", "saturation", "hue",
    "order0", "order1", "order2", "order3", "gray", "blur", "sigma",
)
(FLIP, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, _O1, _O2, _O3, GRAY, BLUR, SIGMA) = range(len(PARAMS))
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision's fn_idx numbering

# The reference blurs 224 px images with a 21-pixel kernel and sigma in [0.1, 2]; both scale with the image.
_REFERENCE_SIZE = 224
_REFERENCE_BLUR_KERNEL = 21
_REFERENCE_BLUR_SIGMA = (0.1, 2.0)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _side(image_size: int | Sequence[int]) -> int:
    return image_size if isinstance(image_size, int) else int(min(image_size))


def blur_kernel_size(image_size: int | Sequence[int]) -> int:
    """The reference's 21-pixel blur kernel at 224 px, scaled to ``image_size`` (odd, at least 3)."""
    kernel = max(3, round(_REFERENCE_BLUR_KERNEL * _side(image_size) / _REFERENCE_SIZE))
    return kernel if kernel % 2 == 1 else kernel + 1


def blur_sigma(image_size: int | Sequence[int]) -> tuple[float, float]:
    """The reference's sigma range (0.1, 2) at 224 px, scaled to ``image_size``."""
    scale = _side(image_size) / _REFERENCE_SIZE
    return (_REFERENCE_BLUR_SIGMA[0] * scale, _REFERENCE_BLUR_SIGMA[1] * scale)


def _uniform(low: float, high: float) -> float:
    # The very call torchvision's transforms draw with, so the random stream advances the same way.
    return float(torch.empty(1).uniform_(low, high).item())


@dataclass(frozen=True)
class LightAugmentation:
    """Flip, colour jitter, grayscale and blur with the reference's probabilities and ranges."""

    blur_kernel: int
    blur_sigma: tuple[float, float]
    flip_p: float = 0.5
    jitter_p: float = 0.2
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    gray_p: float = 0.2
    blur_p: float = 0.2

    @classmethod
    def for_size(cls, image_size: int | Sequence[int]) -> "LightAugmentation":
        return cls(blur_kernel=blur_kernel_size(image_size), blur_sigma=blur_sigma(image_size))

    # -- worker side -----------------------------------------------------------------------------
    def draw(self) -> torch.Tensor:
        """One sample's parameters (a float32 vector, :data:`PARAMS` columns) from torch's global RNG.

        Draws as torchvision's transforms do: ``torch.rand(1) < p`` decides each random
        application; an applied jitter draws ``randperm(4)`` and then its four factors; an applied
        blur draws its sigma. Skipped operations draw nothing more.
        """
        params = torch.zeros(len(PARAMS), dtype=torch.float32)
        params[FLIP] = float(torch.rand(1) < self.flip_p)
        if torch.rand(1) < self.jitter_p:
            params[JITTER] = 1.0
            params[ORDER : ORDER + 4] = torch.randperm(4).float()
            params[BRIGHTNESS] = _uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
            params[CONTRAST] = _uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
            params[SATURATION] = _uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
            params[HUE] = _uniform(-self.hue, self.hue)
        params[GRAY] = float(torch.rand(1) < self.gray_p)
        if torch.rand(1) < self.blur_p:
            params[BLUR] = 1.0
            params[SIGMA] = _uniform(*self.blur_sigma)
        return params

    # -- device side -----------------------------------------------------------------------------
    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augment float images in [0, 1] (B, 3, H, W) with per-sample ``params`` (B, len(PARAMS)).

        ``params`` may stay on the CPU (as the loader delivers them): which samples each operation
        touches is decided there, so no step waits for the device. Returns a new tensor.
        """
        if params.shape != (images.shape[0], len(PARAMS)):
            raise ValueError(f"Expected parameters of shape ({images.shape[0]}, {len(PARAMS)}), got {tuple(params.shape)}.")
        params = params.detach().to("cpu", torch.float32)
        out = images.clone()
        device = images.device

        def rows(mask: torch.Tensor) -> torch.Tensor | None:
            index = torch.nonzero(mask).flatten()
            return index.to(device, non_blocking=True) if index.numel() else None

        def factors(index_cpu: torch.Tensor, column: int) -> torch.Tensor:
            return params[index_cpu, column].to(device, non_blocking=True).view(-1, 1, 1, 1)

        if (index := rows(params[:, FLIP] > 0)) is not None:
            out.index_copy_(0, index, out.index_select(0, index).flip(-1))
        jitter = torch.nonzero(params[:, JITTER] > 0).flatten()
        orders = params[:, ORDER : ORDER + 4].long()
        for position in range(4):
            for op, column in enumerate((BRIGHTNESS, CONTRAST, SATURATION, HUE)):
                chosen = jitter[orders[jitter, position] == op]
                if chosen.numel() == 0:
                    continue
                index = chosen.to(device, non_blocking=True)
                out.index_copy_(0, index, _JITTER_FUNCTIONS[op](out.index_select(0, index), factors(chosen, column)))
        if (index := rows(params[:, GRAY] > 0)) is not None:
            out.index_copy_(0, index, grayscale(out.index_select(0, index)).expand(-1, 3, -1, -1))
        blurred = torch.nonzero(params[:, BLUR] > 0).flatten()
        if blurred.numel():
            index = blurred.to(device, non_blocking=True)
            sigma = params[blurred, SIGMA].to(device, non_blocking=True)
            out.index_copy_(0, index, gaussian_blur(out.index_select(0, index), self.blur_kernel, sigma))
        return out


# -- batched versions of torchvision's float formulas (``factor``: one per sample, (n, 1, 1, 1)) ----


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (torchvision's weights), (n, 1, H, W)."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor + other * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + factor.view(-1, 1, 1)).remainder(1.0)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


_JITTER_FUNCTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] to HSV with hue in [0, 1) (torchvision's formula, itself Pillow's)."""
    r, g, b = images.unbind(dim=-3)
    maxc, minc = images.amax(dim=-3), images.amin(dim=-3)
    equal = maxc == minc
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = spread / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, spread)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    not_red = maxc != r
    is_green = maxc == g
    hue_red = (bc - gc) * ~not_red
    hue_green = (2.0 + rc - bc) * (is_green & not_red)
    hue_blue = (4.0 + gc - rc) * (not_red & ~is_green)
    hue = ((hue_red + hue_green + hue_blue) * (1.0 / 6.0) + 1.0).fmod(1.0)
    return torch.stack((hue, saturation, maxc), dim=-3)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """HSV (hue in [0, 1)) back to RGB in [0, 1] (torchvision's formula)."""
    h, s, v = images.unbind(dim=-3)
    h6 = h * 6.0
    sector = torch.floor(h6)
    fraction = h6 - sector
    sector = sector.to(torch.int64).remainder(6)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * fraction) * v).clamp(0.0, 1.0)
    t = ((1.0 - s + s * fraction) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=images.device)
    index = select[:, sector].movedim(0, -3)  # (n, 3, H, W): which of v, p, q, t each channel takes
    return vpqt.gather(-3, index)


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """One normalised 1-D Gaussian per sigma, (n, kernel_size) (torchvision's sampling of the kernel)."""
    limit = (kernel_size - 1) / (2.0 * 2.0**0.5)
    x = torch.linspace(-limit, limit, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax(-(x.unsqueeze(0) / sigma.float().unsqueeze(1)).pow(2), dim=1)


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image ``i`` with a ``kernel_size`` Gaussian of ``sigma[i]``, reflect padding.

    torchvision convolves with the 2-D outer product of the 1-D kernel; two 1-D passes compute the
    same sum (k instead of k^2 products a pixel), and a grouped convolution gives every image its own
    kernel in one call.
    """
    n, channels, height, width = images.shape
    kernels = gaussian_kernels(kernel_size, sigma).repeat_interleave(channels, dim=0)  # (n * c, k)
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, n * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernels.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    flat = F.conv2d(flat, kernels.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    return flat.view(n, channels, height, width)

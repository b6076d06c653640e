"""The device half of the ``light`` augmentation against torchvision's per-image transforms."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from protoclip_cli.data import augment
from protoclip_cli.data.augment import PARAMS, LightAugmentation
from protoclip_cli.data.transforms import crop_transform, to_model_input, train_transform

torch.set_num_threads(1)
# Float32 formulas evaluated in a different order (batched reductions, separable blur) agree to
# a few units in the last place; 2e-5 of the [0, 1] range is 0.005 of a grey level.
TOLERANCE = 2e-5


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=generator)
    images[0] = images[0, :1]  # a grey image: hue and saturation are undefined there
    return images


def _factors(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "batched, reference, values",
    [
        (augment.adjust_brightness, TF.adjust_brightness, [0.2, 0.7, 1.0, 1.8]),
        (augment.adjust_contrast, TF.adjust_contrast, [0.2, 0.9, 1.3, 1.8]),
        (augment.adjust_saturation, TF.adjust_saturation, [0.2, 0.5, 1.1, 1.8]),
        (augment.adjust_hue, TF.adjust_hue, [-0.2, -0.05, 0.1, 0.2]),
    ],
)
def test_each_jitter_operation_equals_torchvision_per_image(batched, reference, values):
    images = _images(len(values))
    out = batched(images.clone(), _factors(values))
    for i, value in enumerate(values):
        assert torch.allclose(out[i], reference(images[i], value), atol=TOLERANCE, rtol=0), (batched.__name__, value)


def test_grayscale_and_blur_equal_torchvision_per_image():
    images = _images(3, size=32)
    gray = augment.grayscale(images).expand(-1, 3, -1, -1)
    sigmas = torch.tensor([0.1, 0.9, 2.0])
    blurred = augment.gaussian_blur(images, 21, sigmas)
    for i in range(3):
        assert torch.allclose(gray[i], TF.rgb_to_grayscale(images[i], num_output_channels=3), atol=TOLERANCE, rtol=0)
        expected = TF.gaussian_blur(images[i], [21, 21], [float(sigmas[i])] * 2)
        assert torch.allclose(blurred[i], expected, atol=TOLERANCE, rtol=0)


def _photometric_reference(light: LightAugmentation) -> v2.Compose:
    """torchvision's per-image composition of the photometric part, as the reference writes it."""
    return train_transform("light", 24).__class__(train_transform("light", 24).transforms[1:])


@pytest.mark.parametrize("size", [24, 64])
def test_worker_draws_and_device_apply_equal_the_torchvision_pipeline_sample_by_sample(size):
    """Same seed, same decisions: crop in the worker, draw, apply batched == torchvision per image."""
    light = LightAugmentation.for_size(size)
    full = train_transform("light", size)
    crop, photometric = crop_transform("light", size), v2.Compose(full.transforms[1:])
    source = (torch.rand(40, 3, size + 13, size + 7, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    crops, params, expected = [], [], []
    for i, image in enumerate(source):
        torch.manual_seed(1000 + i)
        cropped = crop(image)
        crops.append(cropped)
        params.append(light.draw())
        torch.manual_seed(1000 + i)
        reference_crop = crop(image)
        expected.append(photometric(reference_crop.float() / 255))
    params = torch.stack(params)
    assert params[:, PARAMS.index("jitter")].sum() > 0 and params[:, PARAMS.index("blur")].sum() > 0
    out = light.apply(torch.stack(crops).float() / 255, params)
    assert torch.allclose(out, torch.stack(expected), atol=TOLERANCE, rtol=0)
    # Against the reference on uint8 (torchvision rounds to 8 bits after every operation): close, not equal.
    torch.manual_seed(1000)
    uint8_reference = full(source[0]).float() / 255
    assert (out[0] - uint8_reference).abs().mean() < 3 / 255


def test_parameter_frequencies_and_ranges_follow_the_reference():
    light = LightAugmentation.for_size(224)
    torch.manual_seed(0)
    n = 20000
    params = torch.stack([light.draw() for _ in range(n)])
    column = {name: params[:, i] for i, name in enumerate(PARAMS)}

    def near(rate: float, p: float) -> bool:  # within 4 standard deviations of a binomial proportion
        return abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)

    for name, p in (("flip", 0.5), ("jitter", 0.2), ("gray", 0.2), ("blur", 0.2)):
        assert near(float(column[name].mean()), p), name
    jittered = params[column["jitter"] > 0]
    for name, low, high in (("brightness", 0.2, 1.8), ("contrast", 0.2, 1.8), ("saturation", 0.2, 1.8), ("hue", -0.2, 0.2)):
        values = jittered[:, PARAMS.index(name)]
        assert low <= float(values.min()) and float(values.max()) <= high, name
        # uniform: mean at the centre, standard deviation (high - low) / sqrt(12)
        assert abs(float(values.mean()) - (low + high) / 2) < 4 * (high - low) / math.sqrt(12 * len(values)), name
    orders = jittered[:, PARAMS.index("order0") : PARAMS.index("order3") + 1].long()
    assert bool((orders.sort(dim=1).values == torch.arange(4)).all())
    assert len({tuple(o.tolist()) for o in orders}) == 24  # every order of the four operations occurs
    sigmas = params[column["blur"] > 0, PARAMS.index("sigma")]
    assert 0.1 <= float(sigmas.min()) and float(sigmas.max()) <= 2.0
    assert light.blur_kernel == 21
    skipped = params[column["jitter"] == 0]
    assert float(skipped[:, PARAMS.index("brightness") : PARAMS.index("order3") + 1].abs().sum()) == 0


def test_to_model_input_with_the_device_augmentation_normalises_after_augmenting():
    light = LightAugmentation.for_size(16)
    batch = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(3)
    params = torch.stack([light.draw() for _ in range(5)])
    params[:, PARAMS.index("flip")] = 1.0
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = to_model_input(batch, mean, std, "cpu", light, params)
    expected = (light.apply(batch.float() / 255, params) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="per-sample parameters"):
        to_model_input(batch, mean, std, "cpu", light, None)
    with pytest.raises(ValueError, match="shape"):
        light.apply(batch.float(), params[:3])


def test_extraction_leaves_the_square_resize_to_the_device_with_the_eval_transform_result():
    from protoclip_cli.data.transforms import eval_batch, eval_transform, normalize

    generator = torch.Generator().manual_seed(2)
    squares = [(torch.rand(3, 96, 96, generator=generator) * 255).to(torch.uint8) for _ in range(4)]
    stacked = eval_batch(squares, 64)
    assert stacked.shape == (4, 3, 96, 96)  # untouched in the worker
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    on_device = to_model_input(stacked, mean, std, "cpu", size=64)
    reference = normalize(torch.stack([eval_transform(64)(image) for image in squares]), mean, std, "cpu")
    assert on_device.shape == (4, 3, 64, 64)
    # The same antialiased bicubic kernel in float32 (clamped to 0-255) ...
    exact = torch.nn.functional.interpolate(stacked.float(), size=(64, 64), mode="bicubic", antialias=True).clamp(0, 255)
    assert torch.allclose(on_device, normalize(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), mean, std, "cpu")
                          + exact / 255 / torch.tensor(std).view(1, 3, 1, 1), atol=1e-4)
    # ... while torchvision's uint8 kernel rounds between its two passes: on noise, a third of a grey level on average.
    grey_levels = ((on_device - reference) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()
    assert grey_levels.mean() < 0.5
    # Not all squares of one size (or smaller than the model): the worker runs the eval transform.
    mixed = eval_batch([squares[0], (torch.rand(3, 80, 120, generator=generator) * 255).to(torch.uint8)], 64)
    assert mixed.shape == (2, 3, 64, 64) and torch.equal(mixed[0], eval_transform(64)(squares[0]))
    small = eval_batch([squares[0][:, :32, :32]], 64)
    assert small.shape == (1, 3, 64, 64)

"""plots.metric_curves_png: a metric against samples seen, one line per run (for comparing runs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.reports.plots import metric_curves_png

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two default colours


def _pixels_of(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(image[..., :3].astype(int) - np.array(colour)).sum(axis=-1) < 30).sum())


def test_each_series_is_a_line_in_its_own_colour(tmp_path):
    runs = [
        {"label": "protoclip", "x": [0, 2_000_000, 1_000_000, 3_000_000], "y": [1.0, 20.0, 12.0, 25.0]},
        {"label": "clip", "x": [0, 1_000_000, 2_000_000, 3_000_000], "y": [1.0, 8.0, 14.0, 18.0]},
    ]
    path = metric_curves_png(tmp_path / "curves" / "zeroshot.png", runs, "zero-shot top-1 (%)")
    assert path == tmp_path / "curves" / "zeroshot.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        two = np.asarray(png.convert("RGB"))
    # A line across the axes is hundreds of pixels; a legend swatch alone is a few dozen.
    assert _pixels_of(two, BLUE) > 300 and _pixels_of(two, ORANGE) > 300
    one = np.asarray(Image.open(metric_curves_png(tmp_path / "one.png", runs[:1], "top-1")).convert("RGB"))
    assert _pixels_of(one, BLUE) > 300 and _pixels_of(one, ORANGE) < 50


@pytest.mark.parametrize("series, message", [
    ([], "No curve to plot"),
    ([{"label": "a", "x": [1, 2], "y": [1.0]}], "Curve 'a' has 2 x and 1 y values"),
    ([{"label": "a", "x": [1], "y": [1]}, {"label": "a", "x": [1], "y": [2]}], "Curve 1 has a repeated label 'a'"),
    ([{"x": [1], "y": [1]}], "Curve 0 has no label"),
])
def test_malformed_series_are_refused_before_anything_is_written(tmp_path, series, message):
    with pytest.raises(ProtoclipError, match=message):
        metric_curves_png(tmp_path / "x.png", series, "top-1")
    assert not (tmp_path / "x.png").exists()


def test_a_class_keeps_its_colour_in_the_class_and_prediction_panels():
    from protoclip_cli.evaluation.reports.plots import group_colours

    classes = np.array([0] * 5 + [1] * 3 + [2] * 2 + [3])
    predicted = np.array([1] * 6 + [2] * 4 + [3])  # other sizes: ranked alone, 1 would take 0's colour
    shared = group_colours({"class": classes, "prediction": predicted}, shared=True, most=3)
    assert shared["class"] == shared["prediction"] == {0: 0, 1: 1, 2: 2}  # 3 is grey in both
    alone = group_colours({"class": classes, "clusters": predicted}, most=3)
    assert alone["class"] == {0: 0, 1: 1, 2: 2} and alone["clusters"] == {1: 0, 2: 1, 3: 2}


def test_a_comparisons_curves_draw_each_variant_with_a_band_of_its_seed_spread(tmp_path):
    from protoclip_cli.evaluation.reports.comparison import plot_curves

    flat = {"clip": {1000: [10.0, 10.0], 2000: [20.0, 20.0]}, "protoclip": {1000: [12.0], 2000: [22.0]}}
    plain = np.asarray(Image.open(plot_curves({"top-1": flat}, tmp_path / "flat.png", "t")).convert("RGB"))
    spread = {"clip": {1000: [5.0, 15.0], 2000: [10.0, 30.0]}, "protoclip": {1000: [12.0], 2000: [22.0]}}
    banded = np.asarray(Image.open(plot_curves({"top-1": spread}, tmp_path / "band.png", "t")).convert("RGB"))
    assert _pixels_of(plain, BLUE) > 100 and _pixels_of(plain, ORANGE) > 100  # a line per variant
    # The blue band (alpha 0.2 over white) covers an area only when the seeds spread.
    light_blue = (np.abs(banded.astype(int) - [210, 225, 240]).max(axis=2) < 12).sum()
    assert light_blue > 2000 and (np.abs(plain.astype(int) - [210, 225, 240]).max(axis=2) < 12).sum() < 200


# An unbalanced mathtext expression: matplotlib raises on it when it parses a pair of `$` as math.
WEB_CAPTION = "price $x^$ deal"


@pytest.mark.parametrize("draw", ["curves", "band_curves", "bars", "labelled_grid", "grid", "tsne"])
def test_captions_with_dollar_signs_are_drawn_as_text_everywhere(tmp_path, draw):
    """Web captions and class names carry `$`; every drawing function writes them as plain text
    (titles, labels, legends, tick names and image captions) and leaves matplotlib's settings as
    they were."""
    import matplotlib
    import torch

    from protoclip_cli.evaluation.reports import plots

    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    text = WEB_CAPTION
    calls = {
        "curves": lambda path: plots.curves_png(path, {text: ([1, 2], [3, 4])}, text, text, text, marks={text: 1.5}),
        "band_curves": lambda path: plots.band_curves_png(path, {text: {text: ([1, 2], [3, 4], [0.1, 0.2])}}, text, text),
        "bars": lambda path: plots.bars_png(path, {text: 1.0, "b": 2.0}, text, text, mean_label=text),
        "labelled_grid": lambda path: plots.labelled_grid_png(path, [image, image], [text, text], text),
        "grid": lambda path: plots.grid_png(path, [(0, [(image, text), (image, text)])], text),
        "tsne": lambda path: plots.tsne_png(path, np.empty(0), {text: np.array([0, 1, 1])}, 0, text,
                                            points=np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])),
    }
    path = calls[draw](tmp_path / f"{draw}.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
    assert matplotlib.rcParams["text.parse_math"] is True

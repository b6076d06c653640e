"""Figures written as PNG next to their JSON: curves, bars, t-SNE maps and image grids.

Every function draws with matplotlib's Agg backend (no display needed), writes ``path`` and returns
it. They take plain data (lists, arrays, uint8 image tensors), so any stage can use them:
``evaluate`` (zero-shot top-k curves, the linear probe's weight-decay curve, retrieval recall@k,
the zero-shot suite's bars, t-SNE maps and sample grids), ``cluster`` (cluster grids and t-SNE),
and runs side by side (:func:`metric_curves_png`: a metric against samples seen, one line per run)::

    metric_curves_png(path, [{"label": "protoclip", "x": [...], "y": [...]},
                             {"label": "clip", "x": [...], "y": [...]}], "zero-shot top-1 (%)")
"""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from protoclip_cli.artifacts import atomic_path
from protoclip_cli.errors import ProtoclipError

_Drawing = TypeVar("_Drawing", bound=Callable)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _literal_text(draw: _Drawing) -> _Drawing:
    """Draw every string as it is: captions, class names and titles come from web data, where
    ``$`` is common, and matplotlib would otherwise parse a pair of them as mathtext (and fail on
    one it cannot parse). Scoped to the drawing, so a caller's own matplotlib settings are untouched."""

    @functools.wraps(draw)
    def drawing(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return draw(*args, **kwargs)

    return drawing  # type: ignore[return-value]


def _save(figure, path: Path, title: str) -> Path:
    """Written under a temporary name and renamed (a failed write is one sentence naming ``path``)."""
    plt = _pyplot()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(figure)
    return Path(path)


@_literal_text
def curves_png(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    marks: Mapping[str, float] | None = None,
    legend: bool = False,
) -> Path:
    """One line per named ``(x, y)`` series (with its points marked when there are few), an optional
    vertical line per ``marks`` entry (label -> x), a legend when there is more than one series
    (or ``legend``)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        axis.plot(list(x), list(y), marker="o" if len(x) <= 20 else None, markersize=3, label=name)
    for label, x in (marks or {}).items():
        axis.axvline(x, color="grey", linestyle="--", linewidth=1, label=label)
    if log_x:
        axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if legend or len(series) > 1 or marks:
        axis.legend(fontsize=8)
    return _save(figure, path, title)


def metric_curves_png(
    path: Path,
    series: Sequence[Mapping],
    metric: str,
    title: str = "",
    xlabel: str = "samples seen",
    log_x: bool = False,
) -> Path:
    """One line per run of a metric against samples seen (or any other ``xlabel``).

    ``series`` is a list of ``{"label": str, "x": [samples seen, ...], "y": [metric, ...]}`` (x and y
    of the same non-zero length; labels unique), drawn in the given order with matplotlib's default
    colour cycle (tab:blue, tab:orange, ...), sorted by x. Returns ``path``."""
    named: dict[str, tuple[list[float], list[float]]] = {}
    for i, entry in enumerate(series):
        label, x, y = str(entry.get("label", "")), list(entry.get("x", ())), list(entry.get("y", ()))
        if not label or label in named:
            raise ProtoclipError(f"Curve {i} has {'no' if not label else 'a repeated'} label {label!r}; give each run its own.")
        if not x or len(x) != len(y):
            raise ProtoclipError(f"Curve {label!r} has {len(x)} x and {len(y)} y values; give one y per x (at least one).")
        order = sorted(range(len(x)), key=lambda k: x[k])
        named[label] = ([float(x[k]) for k in order], [float(y[k]) for k in order])
    if not named:
        raise ProtoclipError("No curve to plot; pass at least one series of samples seen and metric values.")
    return curves_png(path, named, xlabel, metric, title or f"{metric} vs {xlabel}", log_x=log_x, legend=True)


@_literal_text
def band_curves_png(
    path: Path, panels: Mapping[str, Mapping[str, tuple[list[float], list[float], list[float]]]], xlabel: str, title: str
) -> Path:
    """One panel per y label; in each, one line per named ``(x, mean, spread)`` series with a band of
    ± spread around it (a mean over seeds and its standard deviation)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, (ylabel, series) in zip(axes[0], panels.items()):
        for name, (xs, means, spread) in series.items():
            (line,) = axis.plot(xs, means, marker="o", label=name)
            axis.fill_between(xs, [m - s for m, s in zip(means, spread)], [m + s for m, s in zip(means, spread)],
                              color=line.get_color(), alpha=0.2)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    return _save(figure, path, title)


@_literal_text
def bars_png(path: Path, values: Mapping[str, float], ylabel: str, title: str, mean_label: str | None = None) -> Path:
    """One bar per name, its value written on it; a dashed line at their mean when ``mean_label``."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(4.0, 0.8 * len(values) + 2), 4))
    names = list(values)
    bars = axis.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
    axis.bar_label(bars, fmt="%.1f", fontsize=7)
    if mean_label is not None and names:
        mean = float(np.mean([values[n] for n in names]))
        axis.axhline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"{mean_label} {mean:.2f}")
        axis.legend(fontsize=8)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    return _save(figure, path, title)


@_literal_text
def labelled_grid_png(
    path: Path, images: Sequence[torch.Tensor], labels: Sequence[str], title: str, colours: Sequence[str] | None = None,
    columns: int = 8,
) -> Path:
    """Images (uint8 (3, H, W)) in rows of ``columns``, each with its label (in its colour, e.g.
    green for a right prediction and red for a wrong one)."""
    plt = _pyplot()
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for i, axis in enumerate(axes.flat):
        axis.axis("off")
        if i < len(images):
            axis.imshow(images[i].permute(1, 2, 0).numpy())
            axis.set_title("\n".join(textwrap.wrap(labels[i], 20)[:3]), fontsize=6,
                           color=colours[i] if colours else "black")  # fmt: skip
    return _save(figure, path, title)


@_literal_text
def grid_png(path: Path, clusters: list[tuple[int, list[tuple[torch.Tensor, str]]]], title: str) -> Path:
    """Rows of sample images (uint8 (3, H, W)) with wrapped captions, one row per cluster."""
    plt = _pyplot()
    columns = max(len(samples) for _, samples in clusters)
    figure, axes = plt.subplots(len(clusters), columns, figsize=(1.9 * columns, 2.3 * len(clusters)), squeeze=False)
    for row, (cluster, samples) in enumerate(clusters):
        for col in range(columns):
            axis = axes[row][col]
            axis.axis("off")
            if col < len(samples):
                image, caption = samples[col]
                axis.imshow(image.permute(1, 2, 0).numpy())
                axis.set_title("\n".join(textwrap.wrap(caption, 24)[:3]), fontsize=6)
        axes[row][0].text(-0.1, 0.5, f"cluster {cluster}", transform=axes[row][0].transAxes, rotation=90,
                          va="center", ha="right", fontsize=8)
    return _save(figure, path, title)


def tsne_points(features: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2) t-SNE of ``features`` (perplexity adapted to small n)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def group_colours(colourings: dict[str, np.ndarray], shared: bool = False, most: int = 20) -> dict[str, dict]:
    """Palette index of each coloured group, per colouring: its ``most`` largest groups get one each
    (the rest stay grey). ``shared``: the colourings name the same groups (class and predicted class),
    so a group keeps one colour in every panel, ranked by its size in the first colouring."""
    found: dict[str, dict] = {}
    for name, labels in colourings.items():
        if shared and found:
            found[name] = next(iter(found.values()))
            continue
        groups, counts = np.unique(labels, return_counts=True)
        largest = groups[np.argsort(-counts, kind="stable")][:most]
        found[name] = {group.item(): i for i, group in enumerate(largest)}
    return found


@_literal_text
def tsne_png(
    path: Path, features: np.ndarray, colourings: dict[str, np.ndarray], seed: int, title: str,
    points: np.ndarray | None = None, shared_colours: bool = False,
) -> Path:
    """A 2-D t-SNE of ``features`` (or the given ``points``), one panel per colouring (the 20 largest
    groups in colour, others grey; :func:`group_colours`)."""
    plt = _pyplot()
    points = tsne_points(features, seed) if points is None else points
    figure, axes = plt.subplots(1, len(colourings), figsize=(5.5 * len(colourings), 5), squeeze=False)
    palette = plt.get_cmap("tab20")
    colours = group_colours(colourings, shared_colours)
    for axis, (name, labels) in zip(axes[0], colourings.items()):
        axis.scatter(points[:, 0], points[:, 1], s=4, c="lightgrey")
        for group, i in colours[name].items():
            member = labels == group
            if member.any():
                axis.scatter(points[member, 0], points[member, 1], s=6, color=palette(i % 20))
        axis.set_title(f"coloured by {name}", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    return _save(figure, path, title)

"""Comparing methods over seeds: mean and spread of each metric, the difference to a baseline and
whether it exceeds the seed noise, the table in the paper's form, and the learning-curve plot.

Pure functions of per-run metric values (``protoclip compare`` reads them from each run's
``eval/<task>.json``), so the statistics are tested on their own.

The noise rule: a difference of means ``d = mean(variant) - mean(baseline)`` *exceeds the seed
noise* when ``|d| > 2 * se`` with ``se = sqrt(s_v^2 / n_v + s_b^2 / n_b)`` (``s``: the sample
standard deviation over seeds, ddof 1; ``n``: the seeds), i.e. more than two standard errors of
the difference (Welch's t above 2). With 3 seeds per side that is a two-sided p of roughly 0.1:
a screen for differences worth trusting, not a significance test. Fewer than 2 seeds on either
side give no estimate of the noise, and no verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from protoclip_cli.evaluation.reports.plots import band_curves_png

NOISE_RULE = "|mean difference| > 2 x sqrt(s_variant^2/n_variant + s_baseline^2/n_baseline) (s: std over seeds, ddof 1)"


@dataclass(frozen=True)
class Metric:
    """A column of the table: the ``metrics[key]`` of the eval result ``task``."""

    task: str
    key: str
    label: str
    higher_is_better: bool | None = True  # None: a diagnostic with no better direction


# The paper's columns (method.md section 5), in its order.
METRICS: tuple[Metric, ...] = (
    Metric("linear-probe", "top1", "linear probe top-1 (%)"),
    Metric("zeroshot", "top1", "zero-shot top-1 (%)"),
    Metric("retrieval", "mean_recall", "retrieval mean recall (%)"),
    Metric("clustering", "ari", "clustering ARI"),
    Metric("clustering", "ami", "clustering AMI"),
    Metric("modality-gap", "gap", "modality gap", None),
)


@dataclass(frozen=True)
class Cell:
    """One metric of one variant over its seeds, and its difference to the baseline."""

    values: tuple[float, ...]
    mean: float
    std: float  # sample standard deviation (ddof 1); nan with one seed
    diff: float | None = None  # mean - baseline mean (None for the baseline itself)
    se: float | None = None  # standard error of the difference
    exceeds_noise: bool | None = None  # None: not enough seeds to tell

    @classmethod
    def from_json(cls, data: dict) -> "Cell":
        nan = float("nan")
        return cls(tuple(data["values"]), data["mean"] if data["mean"] is not None else nan,
                   data["std"] if data["std"] is not None else nan, data["diff"], data["se"], data["exceeds_noise"])

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in
                {"values": list(self.values), "mean": self.mean, "std": self.std, "n": len(self.values),
                 "diff": self.diff, "se": self.se, "exceeds_noise": self.exceeds_noise}.items()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def difference(variant: Sequence[float], baseline: Sequence[float]) -> tuple[float, float | None, bool | None]:
    """(mean difference, its standard error, whether it exceeds the seed noise) by :data:`NOISE_RULE`."""
    mean_v, std_v = mean_std(variant)
    mean_b, std_b = mean_std(baseline)
    diff = mean_v - mean_b
    if len(variant) < 2 or len(baseline) < 2:
        return diff, None, None
    se = math.sqrt(std_v**2 / len(variant) + std_b**2 / len(baseline))
    return diff, se, abs(diff) > 2 * se


def cell(values: Sequence[float], baseline: Sequence[float] | None) -> Cell:
    mean, std = mean_std(values)
    if baseline is None:
        return Cell(tuple(values), mean, std)
    diff, se, exceeds = difference(values, baseline)
    return Cell(tuple(values), mean, std, diff, se, exceeds)


def table(values: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, Cell]]:
    """``values[variant][metric label]`` (one value per seed) -> cells with differences to ``baseline``."""
    base = values.get(baseline)
    return {
        variant: {
            label: cell(seeds, None if variant == baseline or base is None else base[label])
            for label, seeds in metrics.items()
        }
        for variant, metrics in values.items()
    }


def _number(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_cell(c: Cell, digits: int) -> str:
    """``37.11 ± 0.84`` and, off the baseline, ``(+1.20*)``: * = exceeds the seed noise."""
    text = _number(c.mean, digits) + ("" if math.isnan(c.std) else f" ± {_number(c.std, digits)}")
    if c.diff is not None:
        mark = {True: "*", False: "", None: "?"}[c.exceeds_noise]
        text += f" ({c.diff:+.{digits}f}{mark})"
    return text


def digits_for(label: str) -> int:
    return 2 if "%" in label else 3


def markdown(cells: dict[str, dict[str, Cell]], baseline: str) -> str:
    """The table in the paper's form: one row per variant, one column per metric."""
    labels = list(next(iter(cells.values())))
    lines = ["| variant | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for variant, row in cells.items():
        name = f"{variant} (baseline)" if variant == baseline else variant
        lines.append(f"| {name} | " + " | ".join(format_cell(row[label], digits_for(label)) for label in labels) + " |")
    seeds = sorted({len(c.values) for row in cells.values() for c in row.values()})
    lines += [
        "",
        f"Mean ± standard deviation over {'/'.join(map(str, seeds))} seed(s); in brackets the difference to "
        f"{baseline}, marked * when it exceeds the seed noise: {NOISE_RULE} (? = too few seeds to tell).",
    ]
    return "\n".join(lines) + "\n"


def samples_to_reach(curves: dict[str, dict[str, dict[int, list[float]]]], cells: dict[str, dict[str, Cell]],
                     baseline: str) -> dict[str, dict[str, dict]]:
    """For every variant with a learning curve, the samples it needs to reach the baseline's *final*
    mean of each curve metric (the paper's efficiency claim: ProtoCLIP matches CLIP with a fraction of
    the training).

    ``curves[label][variant][samples]`` holds values over seeds; the variant's curve is their mean
    at each point. The answer is the first point whose mean reaches the target, interpolated linearly
    from the point before it (``points``: the two points, or the first one alone when it already
    reaches the target, an upper bound); ``samples`` is None when no point reaches it.
    """
    found: dict[str, dict[str, dict]] = {}
    for label, variants in curves.items():
        if baseline not in cells or label not in cells[baseline]:
            continue
        target = cells[baseline][label].mean
        for variant, points in variants.items():
            xs = sorted(points)
            means = [mean_std(points[x])[0] for x in xs]
            hit = next((i for i, m in enumerate(means) if m >= target), None)
            entry: dict = {"target": target, "samples": None, "points": [[x, m] for x, m in zip(xs, means)][-1:]}
            if hit == 0:
                entry.update(samples=float(xs[0]), points=[[xs[0], means[0]]])
            elif hit is not None:
                x0, y0, x1, y1 = xs[hit - 1], means[hit - 1], xs[hit], means[hit]
                entry.update(samples=x0 + (target - y0) / (y1 - y0) * (x1 - x0), points=[[x0, y0], [x1, y1]])
            found.setdefault(variant, {})[label] = entry
    return found


def cost(seconds: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Training wall time per variant over seeds: mean, std and the ratio of means to the baseline's."""
    base = mean_std(seconds[baseline])[0] if seconds.get(baseline) else math.nan
    result = {}
    for variant, values in seconds.items():
        if values:
            mean, std = mean_std(values)
            result[variant] = {"values": values, "mean": mean, "std": None if math.isnan(std) else std,
                               "ratio": None if math.isnan(base) else mean / base}
    return result


def format_reach(entry: dict | None, budget: int) -> str:
    """``8,190 (0.67 of the budget; 6,144: 33.91 -> 8,192: 34.62)``, ``<= 2,048 (...)`` or ``n/a``."""
    if entry is None:
        return "-"
    points = " -> ".join(f"{int(x):,}: {y:.2f}" for x, y in entry["points"])
    if entry["samples"] is None:
        return f"n/a (last {points})"
    bound = "<= " if len(entry["points"]) == 1 else ""
    return f"{bound}{entry['samples']:,.0f} ({entry['samples'] / budget:.2f} of the budget; {points})"


def cost_markdown(costs: dict[str, dict], efficiency: dict[str, dict[str, dict]], budget: int, baseline: str) -> str:
    """The second table: training wall time and the samples to reach the baseline's final accuracies."""
    labels = sorted({label for per in efficiency.values() for label in per})
    lines = ["| variant | training wall time, s | vs " + baseline + " | "
             + " | ".join(f"samples to {baseline}'s final {label}" for label in labels) + " |",
             "|---|---:|---:|" + "---:|" * len(labels)]
    for variant in list(costs) + [v for v in efficiency if v not in costs]:
        c = costs.get(variant)
        wall = "-" if c is None else f"{c['mean']:.1f}" + ("" if c["std"] is None else f" ± {c['std']:.1f}")
        ratio = "-" if c is None or c["ratio"] is None else f"{c['ratio']:.2f}"
        reach = [format_reach(efficiency.get(variant, {}).get(label), budget) for label in labels]
        lines.append(f"| {variant} | {wall} | {ratio} | " + " | ".join(reach) + " |")
    lines += ["", f"Wall time of each training (mean ± std over seeds). Samples to reach {baseline}'s final mean: "
              "the first learning-curve point whose mean over seeds reaches it, interpolated from the point before "
              "(both shown, samples: top-1 %); n/a: no point reaches it; - : no curve."]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, dict[str, dict[int, list[float]]]], path: Path, title: str) -> Path:
    """Learning curves as a PNG: ``curves[metric label][variant][samples seen]`` = values over seeds;
    one panel per metric, the mean as a line and ± one standard deviation as a band."""
    panels = {}
    for label, variants in curves.items():
        panels[label] = {}
        for variant, points in variants.items():
            xs = sorted(points)
            stats = [mean_std(points[x]) for x in xs]
            panels[label][variant] = (xs, [m for m, _ in stats], [0.0 if math.isnan(s) else s for _, s in stats])
    return band_curves_png(path, panels, "samples seen", title)

"""The one rounding of the tasks' records: a fraction in [0, 1] recorded as a percentage with four
decimals, so that every task's accuracies and recalls read alike (and compare equal when equal)."""

from __future__ import annotations


def percent(fraction: float) -> float:
    return round(100.0 * fraction, 4)


def percents(metrics: dict[str, float]) -> dict[str, float]:
    """Every value of ``metrics`` as :func:`percent`."""
    return {name: percent(value) for name, value in metrics.items()}

"""Summaries of a comparison: the params that differ, and each metric's final and best value per run."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any


from pipeline.compare.subjects import Direction, Subject, metric_direction

logger = logging.getLogger(__name__)

def differing_params(subjects: Sequence[Subject]) -> tuple[dict[str, dict[str, str | None]], int]:
    """The params whose values are not the same in every subject (a missing param counts as a value).

    Args:
        subjects: the compared subjects.

    Returns:
        ``({key: {run_id: value or None}}, number of distinct keys in all)``, keys sorted.
    """
    keys = sorted({k for s in subjects for k in s.params})
    differing = {}
    for key in keys:
        values = {s.run_id: s.params.get(key) for s in subjects}
        if len(set(values.values())) > 1:
            differing[key] = values
    return differing, len(keys)


def _final_and_best(points: Sequence[tuple[int, float]], direction: Direction | None) -> dict[str, Any]:
    final_step, final = points[-1]
    summary: dict[str, Any] = {
        "final": final,
        "final_step": final_step,
        "best": None,
        "best_step": None,
        "direction": direction,
    }
    finite = [(step, value) for step, value in points if not math.isnan(value)]
    if direction is not None and finite:
        pick = max if direction == "max" else min
        best_step, best = pick(finite, key=lambda p: p[1])  # ties: the earliest step
        summary.update(best=best, best_step=best_step)
    return summary


def summarize_metrics(subjects: Sequence[Subject]) -> dict[str, dict[str, dict[str, Any]]]:
    """Final and best value of every metric of every subject (best by :func:`metric_direction`).

    Args:
        subjects: the compared subjects.

    Returns:
        ``{run_id: {metric: {"final", "final_step", "best", "best_step", "direction"}}}``; a metric a subject never
        logged is absent from its entry.
    """
    return {
        s.run_id: {
            key: _final_and_best(points, metric_direction(key)) for key, points in sorted(s.series.items()) if points
        }
        for s in subjects
    }

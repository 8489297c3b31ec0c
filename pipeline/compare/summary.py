"""Summaries of the compared subjects: the params that differ, and each metric's final and best value, best by one
rule (:func:`metric_direction`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pipeline.compare.subjects import Subject

Direction = Literal["max", "min"]

_MAXIMIZE_PREFIXES = ("top1", "top5", "acc")
_MAXIMIZE_NAMES = ("samples_per_s",)
_MINIMIZE_SUBSTRINGS = ("loss",)
_MINIMIZE_NAMES = ("stall_frac",)


def metric_direction(key: str) -> Direction | None:
    """The direction in which a metric improves: the rule behind "best".

    The rule looks at the last ``/``-separated component of the key: ``top1*``, ``top5*``, ``acc*`` and
    ``samples_per_s`` are maximized; anything containing ``loss`` and ``stall_frac`` are minimized; all other
    metrics (``lr``, ``grad_norm``, ``skipped`` …) have no direction and no best value.

    Args:
        key: metric name, e.g. ``val/top1_col2`` or ``train/loss``.

    Returns:
        ``"max"``, ``"min"`` or None.
    """
    leaf = key.rsplit("/", 1)[-1].lower()
    if leaf.startswith(_MAXIMIZE_PREFIXES) or leaf in _MAXIMIZE_NAMES:
        return "max"
    if any(s in leaf for s in _MINIMIZE_SUBSTRINGS) or leaf in _MINIMIZE_NAMES:
        return "min"
    return None


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

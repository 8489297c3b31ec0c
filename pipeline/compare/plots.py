"""PNG plots: one figure per metric with one panel per kind of stage (pretrain, finetune, …), every compared subject's
stages of that kind overlaid on a common x axis — steps as logged, training samples or epochs — so that sibling
stages (a finetune and its from-scratch baseline) lie side by side in one panel instead of one continuing the other;
eval stages are a bar chart of their results per weights kind (``raw``, ``ema``). A standalone run is drawn in the
panel of its ``revcol.kind`` (``run`` when untagged). matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.compare.selection import CompareError
from pipeline.compare.subjects import KIND_TAG, STAGE_TAG, Series, Subject
from pipeline.compare.summary import metric_direction

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

XAxis = Literal["steps", "samples", "epochs"]
X_AXES: tuple[XAxis, ...] = ("steps", "samples", "epochs")
_X_SERIES = {"samples": "train/samples", "epochs": "train/epoch"}
"""The metric every training stage logs at its logging steps, that maps its steps onto the x axis."""
_EVAL = "eval"
_PANEL_ORDER = ("pretrain", "finetune")
_PANEL_SIZE_IN = (8.0, 4.5)
_WIDE_PANEL_IN = 5.5
_FIG_DPI = 100
_MARKERS_UP_TO = 60


@dataclass
class _Curve:
    """One stage (or standalone run) in a panel."""

    label: str
    series: Series
    panel: str


def _curves(subjects: Sequence[Subject]) -> list[_Curve]:
    many = len(subjects) > 1
    curves = []
    for s in subjects:
        if not s.stages:
            tags = s.run.data.tags
            curves.append(_Curve(s.label, s.series, tags.get(KIND_TAG) or tags.get(STAGE_TAG) or "run"))
        for part in s.stages:
            curves.append(_Curve(f"{s.label}: {part.stage}" if many else part.stage, s.stage_series[part.run_id],
                                 part.kind or part.stage))
    return curves


def _weights_results(series: Series, metric: str) -> dict[str, float]:
    """An eval stage's final value of ``metric`` per weights kind (``raw/val/top1`` → ``raw``), else the plain one."""
    suffix = "/" + metric
    kinds = {key[: -len(suffix)]: points[-1][1] for key, points in series.items()
             if key.endswith(suffix) and points and "/" not in key[: -len(suffix)]}
    if not kinds and series.get(metric):
        kinds = {metric: series[metric][-1][1]}
    return dict(sorted(kinds.items()))


def _x_values(curve: _Curve, steps: list[int], x: XAxis) -> list[float]:
    if x == "steps":
        return [float(step) for step in steps]
    import numpy as np

    known = curve.series.get(_X_SERIES[x])
    if not known:
        raise CompareError(f"--x {x}: {curve.label!r} logged no {_X_SERIES[x]} (a run from before it was logged); "
                           "use --x steps")
    return np.interp(steps, [p[0] for p in known], [p[1] for p in known]).tolist()


def _draw_lines(ax: Axes, curves: list[_Curve], metric: str, x: XAxis) -> None:
    for curve in curves:
        points = curve.series[metric]
        marker = "o" if len(points) <= _MARKERS_UP_TO else None  # short or NaN-broken curves stay visible
        ax.plot(_x_values(curve, [p[0] for p in points], x), [p[1] for p in points], label=curve.label,
                linewidth=1.8, marker=marker, markersize=3)
    ax.set_xlabel({"steps": "step", "samples": "training samples", "epochs": "epoch"}[x])
    ax.set_ylabel(metric)
    ax.legend(loc="best", fontsize=8)


WEIGHTS_COLORS = {"raw": "0.35", "ema": "0.7"}
"""Bar colours per weights kind: greys, so that they do not read as the runs the line panels beside them colour."""


def _draw_bars(ax: Axes, results: dict[str, dict[str, float]], metric: str) -> None:
    kinds = sorted({kind for per_curve in results.values() for kind in per_curve})
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        positions = [i + (k - (len(kinds) - 1) / 2) * width for i, per_curve in enumerate(results.values())
                     if kind in per_curve]
        values = [per_curve[kind] for per_curve in results.values() if kind in per_curve]
        bars = ax.bar(positions, values, width=width * 0.95, label=kind, color=WEIGHTS_COLORS.get(kind))
        ax.bar_label(bars, fmt="%.4g", fontsize=7)
    ax.set_xticks(range(len(results)), list(results), fontsize=8)
    ax.set_ylabel(metric)
    ax.legend(title="weights", loc="lower right", fontsize=8)


def plot_metric(subjects: Sequence[Subject], metric: str, *, x: XAxis = "steps",
                path: str | Path | None = None) -> Figure:
    """One figure of ``metric``: a panel per kind of stage, the subjects' stages of that kind overlaid.

    Panels, left to right: pretrain, finetune, other kinds (standalone runs: ``run``), eval (bars). Training panels
    hold one line per stage that logged ``metric`` (labelled ``subject: stage`` when several subjects are compared);
    the eval panel one group of bars per eval stage, one bar per weights kind.

    Args:
        subjects: the compared subjects.
        metric: the metric key.
        x: the x axis of line panels: ``steps`` as logged, ``samples`` (``train/samples``) or ``epochs``
            (``train/epoch``), the stage's logged steps mapped through those series.
        path: where to write the PNG (parent folders are created); not written when None.

    Returns:
        The matplotlib figure (Agg canvas, not registered with pyplot); each axes' title is its panel.

    Raises:
        CompareError: ``x`` is not steps and a plotted stage never logged the series that maps it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[str, list[_Curve]] = {}
    for curve in _curves(subjects):
        drawn = _weights_results(curve.series, metric) if curve.panel == _EVAL else curve.series.get(metric)
        if drawn:
            panels.setdefault(curve.panel, []).append(curve)
    rank = {name: i for i, name in enumerate(_PANEL_ORDER)}
    names = sorted(panels, key=lambda name: (name == _EVAL, rank.get(name, len(rank)), name))
    width = _PANEL_SIZE_IN[0] if len(names) <= 1 else _WIDE_PANEL_IN * len(names)
    fig = Figure(figsize=(width, _PANEL_SIZE_IN[1]), dpi=_FIG_DPI)
    FigureCanvasAgg(fig)
    direction = metric_direction(metric)
    fig.suptitle(metric + (f"  (best = {direction})" if direction else ""))
    for i, name in enumerate(names or ["no data"]):
        ax = fig.add_subplot(1, max(1, len(names)), i + 1)
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        if name == _EVAL:
            _draw_bars(ax, {c.label: _weights_results(c.series, metric) for c in panels[name]}, metric)
        elif name in panels:
            _draw_lines(ax, panels[name], metric, x)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=_FIG_DPI)
    return fig


def _png_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric).strip("_") + ".png"

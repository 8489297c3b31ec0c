"""PNG curves: one figure per metric, one line per subject (pipelines' stages end to end). matplotlib is imported
when a figure is drawn."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.compare.subjects import Subject
from pipeline.compare.summary import metric_direction

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_FIG_SIZE_IN = (8.0, 4.5)
_FIG_DPI = 100
_MARKERS_UP_TO = 60


def plot_metric(subjects: Sequence[Subject], metric: str, *, path: str | Path | None = None) -> Figure:
    """One figure of ``metric`` over steps: one line per subject that logged it (pipelines end to end).

    Stage boundaries of pipelines are drawn as dotted vertical segments (a ``LineCollection``, so
    ``ax.get_lines()`` holds exactly the subjects' curves).

    Args:
        subjects: the compared subjects.
        metric: the metric key.
        path: where to write the PNG (parent folders are created); not written when None.

    Returns:
        The matplotlib figure (Agg canvas, not registered with pyplot); its single axes holds the curves.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIG_SIZE_IN, dpi=_FIG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    laid_out = False
    for s in subjects:
        points = s.series.get(metric)
        if not points:
            continue
        marker = "o" if len(points) <= _MARKERS_UP_TO else None  # short or NaN-broken curves stay visible
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=s.label, linewidth=1.8, marker=marker,
                          markersize=3)
        boundaries = [part.offset for part in s.stages[1:]]
        if boundaries:
            laid_out = True
            ax.vlines(boundaries, 0, 1, transform=ax.get_xaxis_transform(), colors=line.get_color(), linestyles=":",
                      alpha=0.6, linewidth=1.0)
            for part in s.stages[1:]:
                ax.annotate(part.stage, (part.offset, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                            textcoords="offset points", fontsize=7, color=line.get_color())
    direction = metric_direction(metric)
    ax.set_title(metric + (f"  (best = {direction})" if direction else ""))
    ax.set_xlabel("step (stages end to end)" if laid_out else "step")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=_FIG_DPI)
    return fig


def _png_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric).strip("_") + ".png"

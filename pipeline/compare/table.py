"""The comparison as a table: its rows (:func:`table_rows`, also the HTML report's) and the text table that
``revcol compare`` prints without ``--json``."""

from __future__ import annotations

from pipeline.compare.comparison import Comparison
from pipeline.compare.summary import metric_direction


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _clip(text: str | None, width: int | None) -> str:
    if text is None:
        return ""
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def table_rows(comparison: Comparison, *, clip: int | None = 32) -> list[list[str] | str]:
    """The comparison's table as rows: a list is a row (label, then one cell per subject), a str a section heading.

    A blank cell means the subject has no such param or never logged the metric.

    Args:
        comparison: the result of :func:`compare_runs`.
        clip: longest param value shown whole (longer ones end in ``...``); None: never clipped.
    """
    subjects = comparison.subjects
    rows: list[list[str] | str] = [["", *(s.label for s in subjects)]]
    rows.append(["run id (first 12)", *(s.run_id[:12] for s in subjects)])
    kinds = ["pipeline: " + " > ".join(p.stage for p in s.stages) if s.stages else "run" for s in subjects]
    rows.append(["kind", *kinds])
    rows.append(f"params that differ ({len(comparison.params)} of {comparison.n_params}; blank = not set)")
    for key, values in comparison.params.items():
        rows.append([f"  {key}", *(_clip(values[s.run_id], clip) for s in subjects)])
    rows.append("metrics (final = at the last step; best by direction; blank = not logged)")
    for key in sorted({k for per_run in comparison.metrics.values() for k in per_run}):
        cells = [comparison.metrics[s.run_id].get(key) for s in subjects]
        rows.append([f"  {key}  final", *(_fmt(c["final"]) if c else "" for c in cells)])
        direction = metric_direction(key)
        if direction is not None:
            rows.append([f"  {key}  best ({direction})", *(_fmt(c["best"]) if c else "" for c in cells)])
    return rows


def format_table(comparison: Comparison) -> str:
    """The comparison as a text table: one column per subject, rows for runs, differing params and metrics
    (:func:`table_rows`).

    Args:
        comparison: the result of :func:`compare_runs`.

    Returns:
        The table (no trailing newline).
    """
    rows = table_rows(comparison)
    table = [row for row in rows if isinstance(row, list)]
    widths = [max(len(row[i]) for row in table) for i in range(len(comparison.subjects) + 1)]
    lines = []
    for row in rows:
        lines.append(row if isinstance(row, str) else "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)

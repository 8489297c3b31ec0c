"""The whole comparison (select, load, summarize, plot) and its text table."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path


from pipeline.compare.plots import _png_name, plot_metric
from pipeline.compare.selection import load_subjects, select_runs
from pipeline.compare.subjects import CompareError, Comparison, DEFAULT_METRICS, metric_direction
from pipeline.compare.summary import differing_params, summarize_metrics

logger = logging.getLogger(__name__)

def compare_runs(
    tracking_uri: str,
    *,
    experiments: Sequence[str] = (),
    parent: str | None = None,
    run_ids: Sequence[str] = (),
    stage: str | None = None,
    metrics: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
) -> Comparison:
    """Selects runs, summarizes params and metrics, and writes one PNG per plotted metric.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiments: experiment names (see :func:`select_runs`).
        parent: a parent run id.
        run_ids: explicit run ids.
        stage: narrows experiment/parent selections to one stage.
        metrics: metrics to plot; every one must be logged by at least one subject. When None,
            :data:`DEFAULT_METRICS` that some subject logged.
        out_dir: folder for the PNGs (``<metric with / as _>.png``); no plots when None.

    Returns:
        The :class:`Comparison`.

    Raises:
        CompareError: a bad selection, or a requested metric that no selected run logged.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    selected = select_runs(client, experiments=experiments, parent=parent, run_ids=run_ids, stage=stage)
    subjects = load_subjects(client, selected)
    logged = sorted({k for s in subjects for k, points in s.series.items() if points})
    if metrics is None:
        to_plot = [m for m in DEFAULT_METRICS if m in logged]
        for m in DEFAULT_METRICS:
            if m not in logged:
                logger.info("default metric %s was logged by none of the runs; not plotted", m)
    else:
        absent = [m for m in metrics if m not in logged]
        if absent:
            names = ", ".join(repr(m) for m in absent)
            raise CompareError(f"metric(s) {names} absent in all selected runs; logged: {', '.join(logged) or 'none'}")
        to_plot = list(dict.fromkeys(metrics))
    params, n_params = differing_params(subjects)
    comparison = Comparison(tracking_uri, subjects, params, n_params, summarize_metrics(subjects))
    if out_dir is not None:
        for metric in to_plot:
            path = Path(out_dir) / _png_name(metric)
            plot_metric(subjects, metric, path=path)
            comparison.pngs[metric] = str(path)
            logger.info("wrote %s", path)
    return comparison


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _clip(text: str | None, width: int = 32) -> str:
    if text is None:
        return ""
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(comparison: Comparison) -> str:
    """The comparison as a text table: one column per subject, rows for runs, differing params and metrics.

    A blank cell means the subject has no such param or never logged the metric.

    Args:
        comparison: the result of :func:`compare_runs`.

    Returns:
        The table (no trailing newline).
    """
    subjects = comparison.subjects
    rows: list[list[str] | str] = [["", *(s.label for s in subjects)]]  # a str row is a section heading
    rows.append(["run id (first 12)", *(s.run_id[:12] for s in subjects)])
    kinds = ["pipeline: " + " > ".join(p.stage for p in s.stages) if s.stages else "run" for s in subjects]
    rows.append(["kind", *kinds])
    rows.append(f"params that differ ({len(comparison.params)} of {comparison.n_params}; blank = not set)")
    for key, values in comparison.params.items():
        rows.append([f"  {key}", *(_clip(values[s.run_id]) for s in subjects)])
    rows.append("metrics (final = at the last step; best by direction; blank = not logged)")
    for key in sorted({k for per_run in comparison.metrics.values() for k in per_run}):
        cells = [comparison.metrics[s.run_id].get(key) for s in subjects]
        rows.append([f"  {key}  final", *(_fmt(c["final"]) if c else "" for c in cells)])
        direction = metric_direction(key)
        if direction is not None:
            rows.append([f"  {key}  best ({direction})", *(_fmt(c["best"]) if c else "" for c in cells)])
    table = [row for row in rows if isinstance(row, list)]
    widths = [max(len(row[i]) for row in table) for i in range(len(subjects) + 1)]
    lines = []
    for row in rows:
        lines.append(row if isinstance(row, str) else "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)

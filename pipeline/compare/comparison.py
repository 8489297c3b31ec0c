"""The whole comparison: :func:`compare_runs` selects runs, reads them, summarizes params and metrics and writes
the PNGs into a :class:`Comparison` (with its JSON, what ``revcol compare --json`` prints)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.compare.plots import XAxis, _png_name, plot_metric
from pipeline.compare.selection import CompareError, load_subjects, select_runs
from pipeline.compare.subjects import STAGE_TAG, Subject
from pipeline.compare.summary import differing_params, metric_direction, summarize_metrics

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("train/loss", "val/top1")
"""Metrics plotted when ``--metrics`` is not given (those absent from every run are skipped)."""


@dataclass
class Comparison:
    """The result of :func:`compare_runs`.

    Args:
        tracking_uri: where the runs came from.
        subjects: what was compared, in selection order.
        params: differing params, ``{key: {run_id: value or None}}``.
        n_params: how many distinct param keys the subjects have in all.
        metrics: ``{run_id: {metric: {"final", "final_step", "best", "best_step", "direction"}}}``.
        pngs: ``{metric: path}`` of the written plots.
    """

    tracking_uri: str
    subjects: list[Subject]
    params: dict[str, dict[str, str | None]]
    n_params: int
    metrics: dict[str, dict[str, dict[str, Any]]]
    pngs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``revcol compare --json`` prints).

        Returns:
            ``{"tracking_uri", "runs", "differing_params", "n_params", "metrics", "directions", "pngs"}``.
        """
        runs = []
        for s in self.subjects:
            runs.append(
                {
                    "run_id": s.run_id,
                    "label": s.label,
                    "name": s.run.info.run_name,
                    "experiment_id": s.run.info.experiment_id,
                    "kind": s.kind,
                    "status": s.run.info.status,
                    "stage": s.run.data.tags.get(STAGE_TAG),
                    "stages": [asdict(p) for p in s.stages],
                }
            )
        keys = sorted({k for per_run in self.metrics.values() for k in per_run})
        return {
            "tracking_uri": self.tracking_uri,
            "runs": runs,
            "differing_params": self.params,
            "n_params": self.n_params,
            "metrics": self.metrics,
            "directions": {k: metric_direction(k) for k in keys},
            "pngs": self.pngs,
        }


def compare_runs(
    tracking_uri: str,
    *,
    experiments: Sequence[str] = (),
    parent: str | None = None,
    run_ids: Sequence[str] = (),
    stage: str | None = None,
    metrics: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    x: XAxis = "steps",
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
        x: the plots' x axis (see :func:`plot_metric`).

    Returns:
        The :class:`Comparison`.

    Raises:
        CompareError: a bad selection, a requested metric that no selected run logged, or an ``x`` some plotted
            stage cannot be mapped onto.
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
            plot_metric(subjects, metric, x=x, path=path)
            comparison.pngs[metric] = str(path)
            logger.info("wrote %s", path)
    return comparison

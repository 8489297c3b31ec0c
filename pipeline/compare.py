"""`revcol compare`: compare MLflow runs side by side (differing params, final/best metrics, PNG curves).

What is compared ("subjects"):

* a *pipeline*: a parent run with child runs (one per stage, tag ``revcol.stage``, MLflow's
  ``mlflow.parentRunId``). Its stages are laid end to end on one step axis, in start-time order: the first stage's
  steps as logged, the next stage's steps shifted by the previous stage's last step, and so on. A stage's last step
  is the highest step of any metric it logged. Its params are the parent's, plus stage-only keys from the children
  (first stage wins). Metrics logged on the parent run itself are not used.
* a *run*: any run without child runs, its steps as logged.

Selection (combined as a union, in this order, duplicates dropped):

* ``--experiment NAME``: the experiment's top-level runs (pipelines and standalone runs);
* ``--parent RUN_ID``: the parent's child runs, each compared on its own;
* ``RUN_ID ...``: these runs (a parent run becomes a pipeline);
* ``--stage NAME`` narrows experiment/parent selections to runs whose ``revcol.stage`` tag is NAME.

Final and best values. Final is the value at the highest (laid-out) step. Best follows one rule,
:func:`metric_direction`, on the metric's last path component: names starting with ``top1``/``top5``/``acc`` and
``samples_per_s`` are maximized; names containing ``loss`` and ``stall_frac`` are minimized; everything else
(``lr``, ``grad_norm``, counters) has no best. NaN values never count as best.

Only stdlib is imported at module level: ``revcol --help`` must not pay for importing MLflow or matplotlib.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_METRICS",
    "Comparison",
    "CompareError",
    "Subject",
    "add_parser",
    "compare_runs",
    "differing_params",
    "format_table",
    "load_subjects",
    "metric_direction",
    "plot_metric",
    "select_runs",
    "summarize_metrics",
]

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("train/loss", "val/top1")
"""Metrics plotted when ``--metrics`` is not given (those absent from every run are skipped)."""

STAGE_TAG = "revcol.stage"
PARENT_TAG = "mlflow.parentRunId"

Direction = Literal["max", "min"]

_MAXIMIZE_PREFIXES = ("top1", "top5", "acc")
_MAXIMIZE_NAMES = ("samples_per_s",)
_MINIMIZE_SUBSTRINGS = ("loss",)
_MINIMIZE_NAMES = ("stall_frac",)

_FIG_SIZE_IN = (8.0, 4.5)
_FIG_DPI = 100
_MARKERS_UP_TO = 60


class CompareError(ValueError):
    """Bad selection or request (unknown experiment / run id, nothing matched, metric nowhere); names the value."""


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


@dataclass
class StagePart:
    """One stage of a pipeline subject, placed on the pipeline's step axis.

    Args:
        stage: the ``revcol.stage`` tag (the run name when untagged).
        run_id: the child run.
        name: the child run's name.
        offset: added to the stage's logged steps.
        last_step: the highest step any metric of this stage was logged at.
    """

    stage: str
    run_id: str
    name: str
    offset: int
    last_step: int


@dataclass
class Subject:
    """One line of the comparison: a pipeline (parent + stages) or a single run.

    Args:
        run: the MLflow run (the parent for a pipeline).
        children: a pipeline's stage runs in start order (empty for a single run).
        label: display name, unique within a comparison.
        params: the params compared (see the module docstring for pipelines).
        series: per metric, ``(x, value)`` points sorted by x (steps laid end to end for a pipeline).
        stages: where each stage of a pipeline sits on the x axis.
    """

    run: Run
    children: list[Run] = field(default_factory=list)
    label: str = ""
    params: dict[str, str] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stages: list[StagePart] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        """The run id (the parent's for a pipeline)."""
        return self.run.info.run_id

    @property
    def kind(self) -> str:
        """``"pipeline"`` or ``"run"``."""
        return "pipeline" if self.children else "run"


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


# --- selection -------------------------------------------------------------------------------------------------


def _is_missing(err: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in (
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
        "NOT_FOUND",
    )


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except Exception as err:
        if _is_missing(err):
            raise CompareError(f"unknown run id {run_id!r} at {client.tracking_uri}") from err
        raise


def _search(client: MlflowClient, experiment_ids: Sequence[str], filter_string: str = "") -> list[Run]:
    """Every active run matching ``filter_string`` (all pages), oldest first."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            list(experiment_ids),
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _children(client: MlflowClient, run: Run) -> list[Run]:
    return _search(client, [run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run.info.run_id}'")


def _start_key(run: Run) -> tuple[int, str]:
    return (run.info.start_time or 0, run.info.run_name or "")


def select_runs(
    client: MlflowClient,
    *,
    experiments: Sequence[str] = (),
    parent: str | None = None,
    run_ids: Sequence[str] = (),
    stage: str | None = None,
) -> list[tuple[Run, list[Run]]]:
    """Picks what to compare (see the module docstring for the rules).

    Args:
        client: an MLflow client on the tracking URI.
        experiments: experiment names: their top-level runs.
        parent: a parent run id: its child runs, each on its own.
        run_ids: explicit runs; a run with child runs becomes a pipeline.
        stage: keep only runs tagged ``revcol.stage`` = ``stage`` from ``experiments`` and ``parent``.

    Returns:
        ``(run, children)`` pairs in selection order; ``children`` (start order) is empty for a single run.

    Raises:
        CompareError: an unknown experiment or run id, a parent without children, or nothing matched.
    """
    if stage is not None and not (experiments or parent):
        raise CompareError("--stage narrows --experiment/--parent selections; give one of them")
    picked: list[tuple[Run, list[Run]]] = []

    def add(run: Run, children: list[Run]) -> None:
        if all(run.info.run_id != r.info.run_id for r, _ in picked):
            picked.append((run, sorted(children, key=_start_key)))

    for name in experiments:
        found = client.get_experiment_by_name(name)
        if found is None or found.lifecycle_stage == "deleted":
            raise CompareError(f"unknown experiment {name!r} at {client.tracking_uri}")
        runs = _search(client, [found.experiment_id])
        if stage is not None:
            for run in runs:
                if run.data.tags.get(STAGE_TAG) == stage:
                    add(run, [])
            continue
        ids = {r.info.run_id for r in runs}
        kids: dict[str, list[Run]] = {}
        for run in runs:
            parent_id = run.data.tags.get(PARENT_TAG)
            if parent_id in ids:
                kids.setdefault(parent_id, []).append(run)
        for run in runs:
            if run.data.tags.get(PARENT_TAG) not in ids:  # top level (or its parent is gone)
                add(run, kids.get(run.info.run_id, []))
    if parent is not None:
        parent_run = _get_run(client, parent)
        children = _children(client, parent_run)
        if not children:
            raise CompareError(f"run {parent!r} has no child runs (not a pipeline's parent run)")
        for child in sorted(children, key=_start_key):
            if stage is None or child.data.tags.get(STAGE_TAG) == stage:
                add(child, [])
    for run_id in run_ids:
        run = _get_run(client, run_id)
        add(run, _children(client, run))
    if not picked:
        what = [f"experiment {e!r}" for e in experiments] + ([f"parent {parent!r}"] if parent else [])
        narrowed = f" with stage {stage!r}" if stage is not None else ""
        raise CompareError(f"no runs matched: {', '.join(what) or 'no selection'}{narrowed}")
    return picked


# --- loading ---------------------------------------------------------------------------------------------------


def _histories(client: MlflowClient, run: Run) -> dict[str, list[tuple[int, float]]]:
    """Per metric key of ``run``, its ``(step, value)`` history sorted by step (the latest value per step)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for key in sorted(run.data.metrics):
        latest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run.info.run_id, key):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, float(m.value))
        out[key] = [(step, latest[step][1]) for step in sorted(latest)]
    return out


def _labels(runs: Sequence[Run]) -> list[str]:
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.info.run_id[:8]})" for n, r in zip(names, runs)]


def load_subjects(client: MlflowClient, selected: Sequence[tuple[Run, list[Run]]]) -> list[Subject]:
    """Reads params and metric histories and lays pipeline stages end to end.

    Args:
        client: an MLflow client on the tracking URI.
        selected: the output of :func:`select_runs`.

    Returns:
        One :class:`Subject` per selected entry, labels unique.
    """
    subjects = []
    for (run, children), label in zip(selected, _labels([r for r, _ in selected])):
        subject = Subject(run=run, children=list(children), label=label, params=dict(run.data.params))
        if not children:
            subject.series = _histories(client, run)
        offset = 0
        for child in children:
            for key, value in child.data.params.items():
                subject.params.setdefault(key, value)
            history = _histories(client, child)
            last = max((step for points in history.values() for step, _ in points), default=0)
            stage = child.data.tags.get(STAGE_TAG) or child.info.run_name or child.info.run_id[:8]
            subject.stages.append(StagePart(stage, child.info.run_id, child.info.run_name or "", offset, last))
            for key, points in history.items():
                subject.series.setdefault(key, []).extend((step + offset, value) for step, value in points)
            offset += last
        for points in subject.series.values():
            points.sort(key=lambda p: p[0])  # stable: a later stage stays after an earlier one at the same x
        subjects.append(subject)
        logger.debug(
            "loaded %s %s: %d params, %d metrics", subject.kind, label, len(subject.params), len(subject.series)
        )
    return subjects


# --- summaries -------------------------------------------------------------------------------------------------


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


# --- plots -----------------------------------------------------------------------------------------------------


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


# --- the whole comparison --------------------------------------------------------------------------------------


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


# --- text table ------------------------------------------------------------------------------------------------


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


# --- command line ----------------------------------------------------------------------------------------------


def _split_csv(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _default_tracking_uri() -> str:
    from pipeline.config import TrackingConfig

    return os.environ.get("MLFLOW_TRACKING_URI") or TrackingConfig().uri


def _cmd_compare(args: argparse.Namespace) -> int:
    """Runs ``revcol compare``: prints the table (or one JSON object with ``--json``) and writes the PNGs.

    Args:
        args: the parsed command line.

    Returns:
        0 on success, 1 when the tracking store cannot be read; selection errors raise :class:`CompareError`
        (exit status 2 through ``pipeline.cli.main``).
    """
    import sys

    from mlflow.exceptions import MlflowException

    from pipeline.cli import _print_json

    if not (args.run_ids or args.experiment or args.parent):
        raise CompareError("nothing selected: give RUN_ID(s), --experiment NAME or --parent RUN_ID")
    # an interactive command: fail within seconds, not minutes, when the tracking server is down (unless set)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    tracking_uri = args.tracking_uri or _default_tracking_uri()
    metrics = _split_csv([args.metrics]) if args.metrics is not None else None
    try:
        comparison = compare_runs(
            tracking_uri,
            experiments=args.experiment,
            parent=args.parent,
            run_ids=_split_csv(args.run_ids),
            stage=args.stage,
            metrics=metrics,
            out_dir=args.out,
        )
    except MlflowException as err:
        print(f"revcol compare: cannot read runs from {tracking_uri}: {err.message}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(comparison.to_json())
    else:
        print(format_table(comparison))
        for metric, path in comparison.pngs.items():
            print(f"plot {metric}: {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``revcol compare`` to the command line.

    Args:
        subparsers: the ``revcol`` sub-command registry.

    Returns:
        The ``compare`` parser (its ``func`` is set).
    """
    parser = subparsers.add_parser(
        "compare",
        help="compare MLflow runs: differing params, final/best metrics, PNG curves",
        description=(
            "Compare MLflow runs or whole pipelines (a parent run's stages laid end to end). Selections combine. "
            "Best = max for top1/top5/acc/samples_per_s, min for loss/stall_frac; other metrics show the final "
            "value only."
        ),
    )
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (a parent run = its pipeline)")
    parser.add_argument(
        "--experiment", action="append", default=[], metavar="NAME", help="an experiment's top-level runs (repeatable)"
    )
    parser.add_argument("--parent", default=None, metavar="RUN_ID", help="a pipeline's stage runs, each on its own")
    parser.add_argument(
        "--stage", default=None, help="only runs tagged revcol.stage=STAGE (with --experiment/--parent)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the recipe default)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="M1,M2",
        help=f"metrics to plot (default: {','.join(DEFAULT_METRICS)}, those logged)",
    )
    parser.add_argument(
        "--out", default="runs/compare", metavar="DIR", help="folder for the PNGs (default runs/compare)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.set_defaults(func=_cmd_compare)
    return parser

"""Finding the runs to compare in MLflow (by experiment, parent run or run id, narrowed by stage) and reading their
params and metric histories into :class:`~pipeline.compare.subjects.Subject` objects."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.compare.subjects import KIND_TAG, PARENT_TAG, STAGE_TAG, Series, StagePart, Subject

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


class CompareError(ValueError):
    """Bad selection or request (unknown experiment / run id, nothing matched, metric nowhere); names the value."""


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


def _histories(client: MlflowClient, run: Run) -> Series:
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
            subject.stages.append(StagePart(stage, child.info.run_id, child.info.run_name or "", offset, last,
                                            child.data.tags.get(KIND_TAG)))
            subject.stage_series[child.info.run_id] = history
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

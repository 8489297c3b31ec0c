"""What a comparison is made of: metric directions, the runs (or pipelines) compared, and the comparison itself."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlflow.entities import Run

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

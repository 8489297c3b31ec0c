"""What is compared: a :class:`Subject` is a pipeline (a parent run whose stage runs are laid end to end, each a
:class:`StagePart`) or a single run, with its params and metric series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Run

STAGE_TAG = "revcol.stage"
KIND_TAG = "revcol.kind"
PARENT_TAG = "mlflow.parentRunId"

Series = dict[str, list[tuple[int, float]]]
"""Per metric, ``(step, value)`` points sorted by step."""


@dataclass
class StagePart:
    """One stage of a pipeline subject, placed on the pipeline's step axis.

    Args:
        stage: the ``revcol.stage`` tag (the run name when untagged).
        run_id: the child run.
        name: the child run's name.
        offset: added to the stage's logged steps.
        last_step: the highest step any metric of this stage was logged at.
        kind: the ``revcol.kind`` tag (pretrain, finetune, eval), None when untagged.
    """

    stage: str
    run_id: str
    name: str
    offset: int
    last_step: int
    kind: str | None = None


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
        stage_series: a pipeline's stages' own series (their steps as logged), by stage run id.
    """

    run: Run
    children: list[Run] = field(default_factory=list)
    label: str = ""
    params: dict[str, str] = field(default_factory=dict)
    series: Series = field(default_factory=dict)
    stages: list[StagePart] = field(default_factory=list)
    stage_series: dict[str, Series] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """The run id (the parent's for a pipeline)."""
        return self.run.info.run_id

    @property
    def kind(self) -> str:
        """``"pipeline"`` or ``"run"``."""
        return "pipeline" if self.children else "run"

"""What the driver hands a Ray Train worker: plain data, rebuilt into the typed recipe on the worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import Recipe, S3Config, StageConfig

__all__ = ["WorkerJob"]


@dataclass(kw_only=True)
class WorkerJob:
    """The recipe (as JSON, without S3 credentials), the stage's name and the driver's resolved S3 settings."""

    recipe: dict[str, Any]
    stage: str
    s3: S3Config | None = None
    """The driver's resolved S3 settings, credentials included: they travel as an object (its repr hides the
    keys), since the plain recipe above carries none."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self) -> tuple[Recipe, StageConfig]:
        recipe = Recipe.model_validate(self.recipe)
        if self.s3 is not None:
            recipe = recipe.model_copy(update={"s3": self.s3})
        return recipe, recipe.stage(self.stage)

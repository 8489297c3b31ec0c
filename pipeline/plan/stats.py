"""Exact parameter statistics of a stage's model (:class:`ModelStats`), from the model built on the ``meta`` device:
parameter count, the parameters autocast casts, the largest layer and the largest optimizer group."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import OptimConfig, StageConfig


@dataclass(frozen=True)
class ModelStats:
    """Exact parameter statistics of a model configuration, from the model built on the ``meta`` device.

    Attributes:
        name: the variant.
        params: parameter count.
        param_numels: every parameter's element count (for ZeRO-3's persistence threshold).
        cast_params: parameters of Linear/Conv modules (what autocast casts to 16 bits).
        column_cast_params: the largest column's Linear/Conv parameters.
        largest_layer_params: the most parameters held directly by one module (DeepSpeed's "largest layer").
        largest_group_params: elements of the largest AdamW parameter group, without and with layer decay.
    """

    name: str
    params: int
    param_numels: tuple[int, ...]
    cast_params: int
    column_cast_params: int
    largest_layer_params: int
    largest_group_params: tuple[int, int]


def _model_kwargs(stage: StageConfig) -> dict[str, Any]:
    mc = stage.model
    return {
        "name": mc.name,
        "num_classes": mc.num_classes or 1000,
        "intersup": mc.intersup,
        "reversible": mc.reversible,
        "drop_path_rate": mc.drop_path_rate,
        # the speed switches change what is kept for backward, so the trace builds the model with them
        "overrides": json.dumps(
            {"keep_last_column": mc.fast_path, **mc.overrides}, sort_keys=True
        ),
    }


def _build(
    name: str, num_classes: int, intersup: bool, reversible: bool, drop_path_rate: float, overrides: str
) -> nn.Module:
    import revcol

    return revcol.create_model(
        name,
        num_classes=num_classes,
        intersup=intersup,
        reversible=reversible,
        drop_path_rate=drop_path_rate,
        **json.loads(overrides),
    )


@functools.lru_cache(maxsize=32)
def _model_stats_cached(
    name: str, num_classes: int, intersup: bool, reversible: bool, drop_path_rate: float, overrides: str
) -> ModelStats:
    from pipeline.train.optim import param_groups

    with torch.device("meta"):
        model = _build(name, num_classes, intersup, reversible, drop_path_rate, overrides)

    def cast(module: nn.Module) -> int:
        return sum(
            p.numel()
            for m in module.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))
            for p in m.parameters(recurse=False)
        )

    groups = []
    for layer_decay in (None, 0.9):
        sizes = [sum(p.numel() for p in g["params"]) for g in param_groups(model, OptimConfig(layer_decay=layer_decay))]
        groups.append(max(sizes))
    columns = model.columns() if hasattr(model, "columns") else [model]
    numels = tuple(p.numel() for p in model.parameters())
    return ModelStats(
        name=name,
        params=sum(numels),
        param_numels=numels,
        cast_params=cast(model),
        column_cast_params=max(cast(c) for c in columns),
        largest_layer_params=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        largest_group_params=(groups[0], groups[1]),
    )


def model_stats(stage: StageConfig) -> ModelStats:
    """Exact parameter statistics of a stage's model, built on the ``meta`` device (cached in-process).

    Args:
        stage: the stage (its ``model`` section; ``num_classes`` None counts as 1000).

    Returns:
        The statistics.
    """
    return _model_stats_cached(**_model_kwargs(stage))

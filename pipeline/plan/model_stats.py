"""Model statistics and the activation trace: parameter counts from the built model, live activation bytes tracked op by op through one training step on fake tensors."""

from __future__ import annotations


import functools
import json
import logging
import time
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.config import OptimConfig, StageConfig
from pipeline.plan.shapes import ActivationTrace, ModelStats

logger = logging.getLogger(__name__)


def _model_kwargs(stage: StageConfig) -> dict[str, Any]:
    mc = stage.model
    return {
        "name": mc.name,
        "num_classes": mc.num_classes or 1000,
        "intersup": mc.intersup,
        "reversible": mc.reversible,
        "drop_path_rate": mc.drop_path_rate,
        "overrides": json.dumps(mc.overrides, sort_keys=True),
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


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created under it and still alive, after every aten op.

    A storage is counted from the first op that outputs it until it is freed (a weakref finalizer on the storage
    object, which lives as long as the storage). Storages that existed before (weights, gradients, inputs) are
    passed in ``ignore`` and never counted; views and in-place results share their base's storage.
    """

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in self.ignore:
                continue
            size = storage.nbytes()
            self.live[key] = size
            self.current += size
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


@functools.lru_cache(maxsize=64)
def _trace_cached(
    name: str,
    num_classes: int,
    intersup: bool,
    reversible: bool,
    drop_path_rate: float,
    overrides: str,
    image_size: int,
    micro_batch: int,
    train: bool,
    soft_targets: bool,
    all_columns: bool = False,
) -> ActivationTrace:
    import revcol
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import RegularizeConfig
    from pipeline.train.engine import Objective
    from revcol.model import VARIANTS

    # Activation memory of the reversible model does not depend on the number of columns (kept: the stem output
    # and the last state, plus the tapped tops for intermediate heads; backward: one column at a time; inference
    # holds two states at most). Three columns show every backward pattern — the last, a middle one (gradients
    # from a successor, reconstruction) and the first — and four with intermediate supervision (three taps, as
    # for any multiple of four); further columns are left out of the trace, their FLOPs added as copies of
    # column 1. ``all_columns`` traces the full model (tests compare the two).
    arch = json.loads(overrides)
    full_columns = int(arch.get("num_subnet", VARIANTS[name]["num_subnet"]))
    columns = 4 if intersup else 3
    if (reversible or not train) and full_columns > columns and not all_columns:
        arch["num_subnet"] = columns
    else:
        columns = full_columns
    with torch.device("meta"):
        model = _build(name, num_classes, intersup, reversible, drop_path_rate, json.dumps(arch, sort_keys=True))
    cfg = revcol.model_cfg(name)
    objective = Objective(model, RegularizeConfig(), mean=cfg["mean"], std=cfg["std"])
    objective.train(train)
    started = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        objective.to_empty(device="cpu")  # fake CPU tensors: real op semantics (and RNG replay), no memory
        params = list(objective.parameters())
        if train:
            for p in params:
                p.grad = torch.zeros_like(p)  # gradient buffers exist before the step, as in training
        images = torch.randn(micro_batch, 3, image_size, image_size)
        if soft_targets:
            targets = torch.softmax(torch.randn(micro_batch, num_classes), dim=-1)
        else:
            targets = torch.randint(0, num_classes, (micro_batch,))
        before = [images, targets, *params, *(p.grad for p in params if p.grad is not None)]
        tracker = _LiveBytes({t.untyped_storage()._cdata for t in before})
        flops = FlopCounterMode(display=False)
        with torch.set_grad_enabled(train):
            with tracker:
                with flops:
                    loss, logits = objective(images, targets)
                kept, forward_peak = tracker.current, tracker.peak
                if train:
                    loss.backward()
                del loss, logits
        forward_flops = flops.get_total_flops()
        if columns < full_columns:
            per_column = next(sum(v.values()) for k, v in flops.get_flop_counts().items() if k.endswith(".subnet1"))
            forward_flops += (full_columns - columns) * per_column
        backward_peak = tracker.peak
        del objective, model, params, images, targets, before
    logger.debug(
        "traced %s (%d of %d columns) at %dpx x %d (%s) in %.1fs: kept %d, peak %d bytes",
        name, columns, full_columns, image_size, micro_batch, "train" if train else "eval",
        time.perf_counter() - started, kept, backward_peak,
    )
    return ActivationTrace(
        kept_bytes=kept,
        forward_peak_bytes=forward_peak,
        backward_peak_bytes=backward_peak,
        forward_flops=int(forward_flops),
        micro_batch=micro_batch,
        image_size=image_size,
        train=train,
    )


def activation_trace(
    stage: StageConfig, *, image_size: int | None = None, micro_batch: int | None = None
) -> ActivationTrace:
    """Activation bytes and forward FLOPs of one step of ``stage`` (cached in-process).

    One step (forward, the stage's loss — compound with intermediate supervision — and for training stages the
    reversible backward) runs on fake tensors; the live storage bytes are tracked after every op. fp32 semantics.

    Args:
        stage: the stage (model, regularization; ``kind`` eval traces inference only).
        image_size: resolution instead of the stage's.
        micro_batch: micro-batch instead of ``data.batch_size``.

    Returns:
        The trace.

    Raises:
        ValueError: the resolution is not a multiple of 32 (the model's stride-32 pyramid needs one).
    """
    reg = stage.regularize
    size = image_size or _stage_image_size(stage)
    if size % 32:
        raise ValueError(
            f"stage {stage.name!r}: image size {size} is not a multiple of 32 (RevCol's top level has stride 32)"
        )
    return _trace_cached(
        **_model_kwargs(stage),
        image_size=size,
        micro_batch=micro_batch or stage.data.batch_size,
        train=stage.kind != "eval",
        soft_targets=stage.kind != "eval" and (reg.mixup > 0 or reg.cutmix > 0),
    )


def _stage_image_size(stage: StageConfig) -> int:
    """The stage's resolution: ``data.image_size`` or the model's default input size."""
    import revcol

    return stage.data.image_size or int(revcol.model_cfg(stage.model.name)["input_size"][-1])

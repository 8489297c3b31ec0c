"""The activation trace: one step of a stage's model on fake tensors (no memory, no compute), the bytes of live
tensor storages tracked op by op (:class:`_LiveBytes`), and the forward FLOPs (:class:`ActivationTrace`).

Activation memory of the reversible model does not depend on the number of columns, so the trace leaves out
columns beyond the third (fourth with intermediate supervision) and adds their FLOPs; see :func:`_trace_cached`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.config import StageConfig
from pipeline.plan.stats import _build, _model_kwargs

logger = logging.getLogger(__name__)

ACTIVATION_METHOD = (
    "analytic: live tensor-storage bytes tracked op by op through one fp32 training step (forward, loss, "
    "reversible backward) of the stage's model on fake tensors at the stage's resolution and micro-batch; "
    "upper bound under bf16/fp16 autocast; autocast weight-cast cache added analytically"
)


@dataclass(frozen=True)
class ActivationTrace:
    """Activation memory and FLOPs of one step, traced (see :func:`activation_trace`).

    Attributes:
        kept_bytes: live bytes after the forward and loss (memory kept for backward).
        forward_peak_bytes: most live bytes during forward and loss.
        backward_peak_bytes: most live bytes during the whole step (for training: inside backward).
        forward_flops: forward FLOPs of the micro-batch (FlopCounterMode).
        step_flops: FLOPs of the whole step: forward, the recomputed columns' forward again and 2× forward for
            backward (training), or the forward alone (inference).
        micro_batch: the traced micro-batch.
        image_size: the traced resolution.
        train: a training step (forward + backward) rather than inference.
    """

    kept_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    forward_flops: int
    step_flops: int
    micro_batch: int
    image_size: int
    train: bool

    def scaled(self, micro_batch: int) -> ActivationTrace:
        """This trace at another micro-batch: every activation tensor carries the batch dimension."""
        f = micro_batch / self.micro_batch
        return dataclasses.replace(
            self,
            kept_bytes=round(self.kept_bytes * f),
            forward_peak_bytes=round(self.forward_peak_bytes * f),
            backward_peak_bytes=round(self.backward_peak_bytes * f),
            forward_flops=round(self.forward_flops * f),
            step_flops=round(self.step_flops * f),
            micro_batch=micro_batch,
        )


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
    # column 1. A last column kept for backward (``keep_last_column``, the default) runs outside the reversible
    # part, so that part needs one column more to show every pattern: four columns, or with intermediate heads
    # eight (the next multiple of four keeps the taps' pattern). ``all_columns`` traces the full model (tests
    # compare the two).
    arch = json.loads(overrides)
    full_columns = int(arch.get("num_subnet", VARIANTS[name]["num_subnet"]))
    keep_last = reversible and arch.get("keep_last_column", True)
    columns = (8 if keep_last else 4) if intersup else (4 if keep_last else 3)
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
        # backward costs 2× forward; the columns handed to the reversible part run their forward once more
        recomputed = (full_columns - int(bool(keep_last))) / full_columns if reversible and train else 0.0
        step_flops = forward_flops * (3 + recomputed) if train else forward_flops
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
        step_flops=int(step_flops),
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

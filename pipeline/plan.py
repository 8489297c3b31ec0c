"""``revcol plan``: per-worker memory and step cost of each stage of a recipe on a cluster shape, before launching.

For every stage the plan builds a ledger of :class:`MemoryItem` — what is allocated, how many bytes, *where it
lives* (``gpu``, ``host`` or ``nvme``: the tier) and *when* (``persistent``, or during one phase of the step:
``init``, ``forward``, ``backward``, ``grad_reduce``, ``optimizer_step``, ``checkpoint``) — and the peak per tier is
``sum(persistent) + max over phases of sum(phase items)``. A stage fits when the GPU peak, plus a runtime reserve
(CUDA context, cuBLAS/NCCL workspaces) and a fragmentation headroom on the dynamic part, is within the GPU memory
per worker, and the host peak within the host memory per worker (when one is known). Offload (ZeRO-Offload /
ZeRO-Infinity) is a matter of which tier an item is placed on: see :func:`_place`.

Where the numbers come from:

* **Parameter counts** are exact: the stage's model is built on the ``meta`` device (no weights are allocated).
* **Model states** (parameters, gradients, AdamW state, master weights, EMA, communication buckets) are computed
  per ZeRO stage for *this* engine: fp32 weights with torch autocast (``pipeline/train/engine.py``), so parameters,
  gradients and master weights are fp32 — 16 bytes/parameter unsharded (4 weights + 4 gradients + 8 AdamW), ZeRO-1
  shards the AdamW state (and, in DeepSpeed, the gradients too), ZeRO-2 the gradients, ZeRO-3 also the weights.
  ZeRO-1/2/3 also keep a separate fp32 master partition (4/W bytes per parameter): DeepSpeed clones it even from
  fp32 weights (``stage3.py`` means to alias fp32 weights but its device check never matches). These per-stage
  bytes were checked against real DeepSpeed engines on 2 gloo ranks (CPU heap after backward: within 5 % for
  ZeRO-0…3, fp32 and bf16). DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the functions behind
  ``…_all_cold``) assume 16-bit weights and gradients plus an fp32 master (2·P + 18·P/W for ZeRO-2,
  4·largest_layer + 18·P/W for ZeRO-3): their figure is reported beside ours as ``deepspeed_estimate`` for
  comparison, not used for the verdict.
* **Activations** are *analytic, from the model itself*: one training step (forward with the reversible columns,
  the stage's loss, reversible backward) is run on fake tensors (``FakeTensorMode``: meta storage, no memory,
  no compute) at the stage's resolution and micro-batch, and the bytes of live tensor storages are tracked after
  every aten op (:class:`_LiveBytes`). That gives the memory kept for backward (live bytes after the loss — what
  ``revcol.measure.memory_kept_for_backward`` measures on a real CPU run; tests compare the two), the forward peak,
  and the backward peak (kept + one column's level-by-level recompute working set + gradients in flight). The
  trace runs in fp32; under bf16/fp16 autocast the GPU keeps many of these tensors in 16 bits, so for those
  precisions the traced activation bytes are an upper bound. Autocast's weight-cast cache (16-bit copies of
  Linear/Conv weights, alive through the forward, and one column's during its recompute) is added analytically.
* **FLOPs**: the forward is counted by ``torch.utils.flop_counter.FlopCounterMode`` during the same trace; a training
  step of the reversible model is ≈ 4× forward (forward, recompute, 2× backward). The counter's own backward count
  is not used: it ignores ``groups`` in ``convolution_backward`` and over-counts depthwise convolutions ×C.

Traces and model statistics are cached in-process per (model, classes, resolution, micro-batch, ...), so planning
suggestions and several recipes sharing a model costs one trace each.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import math
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.config import DeepSpeedConfig, OptimConfig, Recipe, StageConfig, load_recipe

__all__ = [
    "ActivationTrace",
    "ClusterShape",
    "MemoryItem",
    "ModelStats",
    "Plan",
    "StagePlan",
    "add_parser",
    "activation_trace",
    "model_stats",
    "plan_recipe",
    "plan_stage",
]

logger = logging.getLogger(__name__)

GiB = 2**30
Tier = Literal["gpu", "host", "nvme"]
Phase = Literal["persistent", "init", "forward", "backward", "grad_reduce", "optimizer_step", "checkpoint"]
PHASES: tuple[str, ...] = ("init", "forward", "backward", "grad_reduce", "optimizer_step", "checkpoint")

ACTIVATION_METHOD = (
    "analytic: live tensor-storage bytes tracked op by op through one fp32 training step (forward, loss, "
    "reversible backward) of the stage's model on fake tensors at the stage's resolution and micro-batch; "
    "upper bound under bf16/fp16 autocast; autocast weight-cast cache added analytically"
)

# Engine constants (fp32 weights + torch autocast, see pipeline/train/engine.py).
_FP32 = 4
_ADAM = 8  # exp_avg + exp_avg_sq, fp32
# DeepSpeed defaults (deepspeed/runtime/zero/config.py), overridable through deepspeed.extra.zero_optimization.
_DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
}
_ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # engine.buffered_allreduce_fallback(elements_per_buffer=5e8)
_PREFETCH_BATCHES = 4  # input batches held by the Ray Data iterator and the step (decoded fp32 images)


# ------------------------------------------------------------------------------------------------ data model
@dataclass(frozen=True)
class ClusterShape:
    """The cluster a recipe is planned for, per worker (one worker = one GPU when ``use_gpu``).

    Attributes:
        workers: data-parallel workers (the ZeRO world size).
        use_gpu: workers train on GPUs; otherwise on CPU, and device memory is host memory.
        gpu_mem_gib: GPU memory per worker, GiB.
        host_mem_gib: host memory per worker, GiB; None: not checked.
        cpus_per_worker: CPU cores available per worker; None: not checked.
        gpus_per_node: GPUs per node (only for DeepSpeed's estimator, which splits by node).
        sources: where each value came from (``recipe``, ``cli`` or ``default``).
    """

    workers: int
    use_gpu: bool = True
    gpu_mem_gib: float = 80.0
    host_mem_gib: float | None = None
    cpus_per_worker: float | None = None
    gpus_per_node: int = 8
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpu_mem_gib <= 0:
            raise ValueError(f"gpu memory must be > 0 GiB, got {self.gpu_mem_gib}")
        if self.host_mem_gib is not None and self.host_mem_gib <= 0:
            raise ValueError(f"host memory must be > 0 GiB, got {self.host_mem_gib}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        workers: int | None = None,
        gpu_mem_gib: float | None = None,
        host_mem_gib: float | None = None,
        cpus_per_worker: float | None = None,
    ) -> ClusterShape:
        """The recipe's ``scaling`` section, with any of its values replaced by the given ones.

        Args:
            recipe: the validated recipe.
            workers: workers instead of ``scaling.num_workers`` (0 there means one in-process worker).
            gpu_mem_gib: GPU memory per worker instead of ``scaling.gpu_memory_gb`` (80 when neither is set).
            host_mem_gib: host memory per worker instead of ``scaling.memory_per_worker_gb``.
            cpus_per_worker: cores per worker instead of ``scaling.cpus_per_worker``.

        Returns:
            The cluster shape, with ``sources`` saying where each value came from.
        """
        sc = recipe.scaling
        sources = {}

        def pick(name: str, given: Any, from_recipe: Any, default: Any) -> Any:
            if given is not None:
                sources[name] = "cli"
                return given
            if from_recipe is not None:
                sources[name] = "recipe"
                return from_recipe
            sources[name] = "default"
            return default

        return cls(
            workers=pick("workers", workers, max(sc.num_workers, 1), 1),
            use_gpu=sc.use_gpu,
            gpu_mem_gib=pick("gpu_mem_gib", gpu_mem_gib, sc.gpu_memory_gb, 80.0),
            host_mem_gib=pick("host_mem_gib", host_mem_gib, sc.memory_per_worker_gb, None),
            cpus_per_worker=pick("cpus_per_worker", cpus_per_worker, None, None),
            sources=sources,
        )


@dataclass(frozen=True)
class MemoryItem:
    """One allocation of a worker: what, how many bytes, where it lives, when it is alive, how it is known.

    Attributes:
        name: what it is (``"AdamW state (exp_avg, exp_avg_sq), 1/8"``).
        bytes: size in bytes.
        tier: where it lives: ``gpu``, ``host`` or ``nvme``.
        phases: ``("persistent",)`` for the whole run, else the step phases during which it is alive.
        source: ``computed`` (from exact parameter counts and the engine's layout), ``traced`` (activation trace)
            or ``assumed`` (a documented constant).
    """

    name: str
    bytes: int
    tier: Tier
    phases: tuple[str, ...] = ("persistent",)
    source: str = "computed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": int(self.bytes),
            "gib": round(self.bytes / GiB, 3),
            "tier": self.tier,
            "phases": list(self.phases),
            "source": self.source,
        }


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


@dataclass(frozen=True)
class ActivationTrace:
    """Activation memory and FLOPs of one step, traced (see :func:`activation_trace`).

    Attributes:
        kept_bytes: live bytes after the forward and loss (memory kept for backward).
        forward_peak_bytes: most live bytes during forward and loss.
        backward_peak_bytes: most live bytes during the whole step (for training: inside backward).
        forward_flops: forward FLOPs of the micro-batch (FlopCounterMode).
        micro_batch: the traced micro-batch.
        image_size: the traced resolution.
        train: a training step (forward + backward) rather than inference.
    """

    kept_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    forward_flops: int
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
            micro_batch=micro_batch,
        )


@dataclass
class StagePlan:
    """The plan of one stage: ledger, peaks, FLOPs, verdict and what to change when it does not fit."""

    stage: str
    kind: str
    model: str
    image_size: int
    micro_batch: int
    grad_accum: int
    workers: int
    zero_stage: int
    precision: str
    stats: ModelStats
    trace: ActivationTrace
    items: list[MemoryItem]
    gpu_budget_bytes: int | None
    host_budget_bytes: int | None
    reserve_bytes: int
    headroom: float
    problems: list[str] = field(default_factory=list)
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deepspeed_estimate: dict[str, Any] | None = None

    # ------------------------------------------------------------------ derived numbers
    def tier_items(self, tier: str) -> list[MemoryItem]:
        return [i for i in self.items if i.tier == tier]

    def phase_bytes(self, tier: str) -> dict[str, int]:
        """Bytes alive in each phase on ``tier`` on top of the persistent ones."""
        return {ph: sum(i.bytes for i in self.tier_items(tier) if ph in i.phases) for ph in PHASES}

    def persistent_bytes(self, tier: str) -> int:
        return sum(i.bytes for i in self.tier_items(tier) if "persistent" in i.phases)

    def peak(self, tier: str) -> tuple[int, str]:
        """Peak bytes on ``tier`` and the phase where it happens."""
        phases = self.phase_bytes(tier)
        phase = max(phases, key=lambda p: phases[p])
        return self.persistent_bytes(tier) + phases[phase], phase

    def required_bytes(self, tier: str) -> int:
        """Peak plus fragmentation headroom on the dynamic part, plus the runtime reserve on the device."""
        peak, phase = self.peak(tier)
        dynamic = self.phase_bytes(tier)[phase]
        extra = self.reserve_bytes if tier == self.device_tier else 0
        return peak + math.ceil(self.headroom * dynamic) + extra

    @property
    def device_tier(self) -> str:
        return "gpu" if self.gpu_budget_bytes is not None else "host"

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.workers

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def model_state_bytes(self) -> int:
        """Persistent bytes of parameters, gradients, master weights and optimizer state on all tiers."""
        kinds = ("parameters", "gradients", "master weights", "AdamW state")
        return sum(i.bytes for i in self.items if "persistent" in i.phases and i.name.startswith(kinds))

    @property
    def step_flops(self) -> int:
        """FLOPs of one micro-batch step on one worker: ≈ 4× forward for training (reversible), 1× for eval."""
        return self.trace.forward_flops * (4 if self.trace.train else 1)

    def to_dict(self) -> dict[str, Any]:
        tiers = sorted({i.tier for i in self.items})
        per_worker = {}
        for tier in tiers:
            peak, phase = self.peak(tier)
            per_worker[tier] = {
                "persistent_bytes": self.persistent_bytes(tier),
                "peak_bytes": peak,
                "peak_phase": phase,
                "required_bytes": self.required_bytes(tier),
                "phase_bytes": self.phase_bytes(tier),
            }
        return {
            "stage": self.stage,
            "kind": self.kind,
            "model": self.model,
            "params": self.stats.params,
            "image_size": self.image_size,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "workers": self.workers,
            "global_batch": self.global_batch,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "per_worker_bytes": {tier: v["required_bytes"] for tier, v in per_worker.items()},
            "per_worker": per_worker,
            "budget_bytes": {"gpu": self.gpu_budget_bytes, "host": self.host_budget_bytes},
            "reserve_bytes": self.reserve_bytes,
            "headroom": self.headroom,
            "model_state_bytes": self.model_state_bytes,
            "activations": {
                "method": ACTIVATION_METHOD,
                "kept_for_backward_bytes": self.trace.kept_bytes,
                "forward_peak_bytes": self.trace.forward_peak_bytes,
                "backward_peak_bytes": self.trace.backward_peak_bytes,
            },
            "flops": {
                "forward_per_micro_batch": self.trace.forward_flops,
                "step_per_micro_batch": self.step_flops,
                "step_rule": "4x forward (forward + recompute + 2x backward)" if self.trace.train else "forward",
                "per_optimizer_step_all_workers": self.step_flops * self.grad_accum * self.workers,
            },
            "deepspeed_estimate": self.deepspeed_estimate,
            "items": [i.to_dict() for i in self.items],
            "verdict": "fits" if self.fits else "does not fit",
            "problems": self.problems,
            "suggestions": self.suggestions,
            "notes": self.notes,
        }


@dataclass
class Plan:
    """The plan of a recipe: one :class:`StagePlan` per planned stage."""

    recipe: str
    cluster: ClusterShape
    stages: list[StagePlan]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def refusal(self) -> str:
        """A one-paragraph reason naming every stage that does not fit and the first fix that would."""
        lines = []
        for s in self.stages:
            if s.fits:
                continue
            fix = next((x for x in s.suggestions if x["fits"]), None)
            hint = f"; fix: {x_cli(fix)} ({fix['why']})" if fix else "; no single change found that fits"
            lines.append(f"stage {s.stage!r}: {'; '.join(s.problems)}{hint}")
        return f"recipe {self.recipe!r} does not fit: " + " | ".join(lines)

    def to_dict(self) -> dict[str, Any]:
        c = self.cluster
        return {
            "recipe": self.recipe,
            "cluster": {
                "workers": c.workers,
                "use_gpu": c.use_gpu,
                "gpu_mem_gib": c.gpu_mem_gib,
                "host_mem_gib": c.host_mem_gib,
                "cpus_per_worker": c.cpus_per_worker,
                "sources": c.sources,
            },
            "activation_method": ACTIVATION_METHOD,
            "stages": [s.to_dict() for s in self.stages],
            "fits": self.fits,
            "verdict": "fits" if self.fits else "does not fit",
        }


def x_cli(suggestion: dict[str, Any]) -> str:
    """A suggestion as ``--set`` arguments."""
    return " ".join(f"--set {o}" for o in suggestion["set"])


# ------------------------------------------------------------------------------------------- model statistics
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


# ----------------------------------------------------------------------------------------- activation trace
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
    gc.collect()
    return ActivationTrace(
        kept_bytes=kept,
        forward_peak_bytes=forward_peak,
        backward_peak_bytes=backward_peak,
        forward_flops=int(forward_flops),
        micro_batch=micro_batch,
        image_size=image_size,
        train=train,
    )


def activation_trace(stage: StageConfig, *, image_size: int | None = None, micro_batch: int | None = None) -> ActivationTrace:
    """Activation bytes and forward FLOPs of one step of ``stage`` (cached in-process).

    One step (forward, the stage's loss — compound with intermediate supervision — and for training stages the
    reversible backward) runs on fake tensors; the live storage bytes are tracked after every op. fp32 semantics.

    Args:
        stage: the stage (model, regularization; ``kind`` eval traces inference only).
        image_size: resolution instead of the stage's.
        micro_batch: micro-batch instead of ``data.batch_size``.

    Returns:
        The trace.
    """
    reg = stage.regularize
    return _trace_cached(
        **_model_kwargs(stage),
        image_size=image_size or stage_image_size(stage),
        micro_batch=micro_batch or stage.data.batch_size,
        train=stage.kind != "eval",
        soft_targets=stage.kind != "eval" and (reg.mixup > 0 or reg.cutmix > 0),
    )


def stage_image_size(stage: StageConfig) -> int:
    """The stage's resolution: ``data.image_size`` or the model's default input size."""
    import revcol

    return stage.data.image_size or int(revcol.model_cfg(stage.model.name)["input_size"][-1])


# ----------------------------------------------------------------------------------------------- the ledger
def _zero_option(ds: DeepSpeedConfig, key: str) -> Any:
    zero = ds.extra.get("zero_optimization", {}) if isinstance(ds.extra, dict) else {}
    if key in zero:
        return zero[key]
    if key.startswith("stage3_") and key.removeprefix("stage3_") in zero:
        return zero[key.removeprefix("stage3_")]
    return _DS_DEFAULTS.get(key)


def _place(name: str, ds: DeepSpeedConfig, device: Tier) -> Tier:
    """Where a model state lives. The one place that knows offload: optimizer state and master weights follow
    ``offload_optimizer``, ZeRO-3 parameter partitions follow ``offload_param``. (ZeRO-Infinity's pinned staging
    and NVMe swap buffers, and offload bandwidth, are not modelled.)"""
    offloaded = {"none": device, "cpu": "host", "nvme": "nvme"}
    if name.startswith(("AdamW state", "master weights")):
        return offloaded[ds.offload_optimizer]
    if name.startswith(("flat fp32 gradient", "AdamW step temporary")) or (
        name.startswith("gradients (fp32, 1/") and ds.zero_stage >= 2
    ):
        # The optimizer step runs where the state is; its gradients are staged in host memory even for NVMe.
        return device if ds.offload_optimizer == "none" else "host"
    if name.startswith("parameters (fp32") and ds.zero_stage == 3:
        return offloaded[ds.offload_param]
    return device


def _model_state_items(
    stats: ModelStats, stage: StageConfig, workers: int, device: Tier, *, ema: bool
) -> list[MemoryItem]:
    """Parameters, gradients, master weights, AdamW state, EMA and ZeRO buffers for one worker."""
    ds = stage.deepspeed
    z, w, p = ds.zero_stage, workers, stats.params
    shard = f", 1/{w}" if w > 1 else ""
    items: list[tuple[str, int, tuple[str, ...]]] = []
    if z == 3:
        threshold = int(_zero_option(ds, "stage3_param_persistence_threshold"))
        small = sum(n for n in stats.param_numels if n < threshold)
        items += [
            (f"parameters (fp32{shard})", _FP32 * math.ceil(p / w), ("persistent",)),
            (f"parameters kept whole (numel < {threshold}, fp32)", _FP32 * small, ("persistent",)),
            (f"gradients (fp32{shard})", _FP32 * math.ceil(p / w), ("persistent",)),
        ]
    else:
        items.append(("parameters (fp32)", _FP32 * p, ("persistent",)))
        if z:
            # DeepSpeed's ZeRO-1 also reduces into the owned partition during backward (measured: ZeRO-1 and
            # ZeRO-2 hold the same bytes after backward).
            items.append((f"gradients (fp32{shard})", _FP32 * math.ceil(p / w), ("persistent",)))
        else:
            items.append(("gradients (fp32)", _FP32 * p, ("persistent",)))
    if z:
        # DeepSpeed keeps a separate fp32 master partition even when the weights are fp32: stage_1_and_2.py clones
        # it; stage3.py would alias it, but compares a torch.device with a device-name string, so it copies too.
        items.append((f"master weights (fp32{shard})", _FP32 * math.ceil(p / w), ("persistent",)))
    items.append((f"AdamW state (exp_avg, exp_avg_sq{shard if z else ''})", _ADAM * math.ceil(p / (w if z else 1)), ("persistent",)))
    if ema:
        ema_bytes = _FP32 * (math.ceil(p / w) if z == 3 else p)
        items.append((f"EMA weights (fp32{shard if z == 3 else ''})", ema_bytes, ("persistent",)))
        items.append(("EMA gathered whole for a checkpoint (fp32)", _FP32 * p, ("checkpoint",)))

    # Communication buffers.
    comm_dtypes = 1 if ds.precision == "fp32" else 2  # autocast: Linear/Conv gradients communicate in 16 bits
    bucket = int(_zero_option(ds, "reduce_bucket_size"))
    if z == 0:
        if w > 1:
            items.append(("gradient all-reduce bucket (fp32)", _FP32 * min(p, _ZERO0_ALLREDUCE_ELEMENTS), ("grad_reduce",)))
    elif _zero_option(ds, "contiguous_gradients"):
        overlap = ds.extra.get("zero_optimization", {}).get("overlap_comm", z == 3) if ds.extra else z == 3
        if z == 3:
            per = _FP32 + (2 if comm_dtypes == 2 else 0)  # one bucket per comm dtype, typed like it
            items.append((f"gradient reduce buckets ({comm_dtypes} dtype(s) x {bucket:.0e})", per * bucket, ("persistent",)))
        else:
            copies = comm_dtypes * (2 if overlap else 1)  # fp32 staging per comm dtype, doubled with overlap_comm
            items.append((f"gradient reduce buckets ({copies} x {bucket:.0e} fp32)", copies * _FP32 * bucket, ("persistent",)))
    if z == 3:
        prefetch = int(_zero_option(ds, "stage3_prefetch_bucket_size"))
        live = min(stats.largest_layer_params + prefetch, int(_zero_option(ds, "stage3_max_live_parameters")))
        items.append(("gathered parameters (largest layer + prefetch, fp32)", _FP32 * live, ("forward", "backward")))
        # The model is built whole on the host and moved to the device before DeepSpeed partitions it.
        items.append(("parameters whole before partitioning (fp32)", _FP32 * p, ("init",)))

    # Optimizer step transients: the flat fp32 gradient of the owned partition, and torch AdamW's foreach
    # temporary (sqrt of exp_avg_sq) over the largest parameter group on this rank.
    group = stats.largest_group_params[1 if stage.optim.layer_decay is not None else 0]
    if z:
        sub_group = int(_zero_option(ds, "sub_group_size"))
        items.append(("flat fp32 gradient for the optimizer step", _FP32 * min(math.ceil(p / w), sub_group), ("optimizer_step",)))
        items.append(("AdamW step temporary (largest group partition)", _FP32 * math.ceil(group / w), ("optimizer_step",)))
    else:
        items.append(("AdamW step temporary (largest group)", _FP32 * group, ("optimizer_step",)))
    return [MemoryItem(n, b, _place(n, ds, device), ph) for n, b, ph in items]


def _activation_items(
    stats: ModelStats, trace: ActivationTrace, precision: str, device: Tier
) -> list[MemoryItem]:
    items = [
        MemoryItem("activations: forward peak (traced)", trace.forward_peak_bytes, device, ("forward",), "traced"),
    ]
    if trace.train:
        items.append(
            MemoryItem(
                "activations: kept for backward + recompute working set (traced)",
                trace.backward_peak_bytes,
                device,
                ("backward",),
                "traced",
            )
        )
    if precision != "fp32":
        items.append(MemoryItem("autocast weight-cast cache (16-bit Linear/Conv weights)", 2 * stats.cast_params, device, ("forward",)))
        if trace.train:
            items.append(MemoryItem("autocast weight-cast cache, one column's recompute", 2 * stats.column_cast_params, device, ("backward",)))
    return items


def _host_items(
    stats: ModelStats, stage: StageConfig, trace: ActivationTrace, *, ema: bool, runtime_host_bytes: int
) -> list[MemoryItem]:
    p = stats.params
    batch_bytes = _PREFETCH_BATCHES * trace.micro_batch * 3 * trace.image_size**2 * _FP32
    items = [
        MemoryItem("process runtime (Python, torch, Ray, CUDA host side)", runtime_host_bytes, "host", source="assumed"),
        MemoryItem(f"input batches in flight ({_PREFETCH_BATCHES}, fp32)", batch_bytes, "host"),
        MemoryItem("model built on the host before DeepSpeed (fp32)", _FP32 * p, "host", ("init",)),
    ]
    if stage.init_from:
        items.append(MemoryItem("init_from weights read on the host (fp32)", _FP32 * p, "host", ("init",)))
    if stage.kind != "eval":
        items.append(MemoryItem("exported weights on the host (rank 0, fp32)", _FP32 * p, "host", ("checkpoint",)))
        if ema:
            items.append(MemoryItem("EMA copied to the host for saving (fp32)", _FP32 * p, "host", ("checkpoint",)))
    return items


def _inference_state_items(stats: ModelStats, stage: StageConfig, workers: int, device: Tier) -> list[MemoryItem]:
    ds, p = stage.deepspeed, stats.params
    if ds.zero_stage == 3:
        return [
            MemoryItem(f"parameters (fp32, 1/{workers})", _FP32 * math.ceil(p / workers), _place("parameters", ds, device)),
            MemoryItem(
                "gathered parameters (largest layer + prefetch, fp32)",
                _FP32 * (stats.largest_layer_params + int(_zero_option(ds, "stage3_prefetch_bucket_size"))),
                device,
                ("forward",),
            ),
        ]
    return [MemoryItem("parameters (fp32)", _FP32 * p, device)]


def _deepspeed_estimate(stats: ModelStats, stage: StageConfig, cluster: ClusterShape) -> dict[str, Any]:
    """DeepSpeed's own model-state estimate for this stage (16-bit weights assumed), for comparison."""
    ds = stage.deepspeed
    per_node = min(cluster.gpus_per_node, cluster.workers)
    nodes = math.ceil(cluster.workers / per_node)
    note = (
        "DeepSpeed's estimator assumes 16-bit weights and gradients plus an fp32 master copy; this engine trains "
        "fp32 weights under autocast (see model_state_bytes), so the two differ by design"
    )
    if ds.zero_stage in (0, 1):
        return {"function": None, "note": f"DeepSpeed has no estimator for ZeRO-{ds.zero_stage}"}
    if ds.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            stats.params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=ds.offload_optimizer != "none"
        )
        fn = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs"
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            stats.params,
            stats.largest_layer_params,
            num_gpus_per_node=per_node,
            num_nodes=nodes,
            cpu_offload=ds.offload_optimizer != "none",
            cpu_offload_params=ds.offload_param != "none",
            zero_init=False,
        )
        fn = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
    return {"function": fn, "gpu_bytes": int(gpu), "cpu_bytes_per_node": int(cpu), "note": note}


# ----------------------------------------------------------------------------------------------- planning
def plan_stage(
    stage: StageConfig,
    cluster: ClusterShape,
    *,
    reserve_gib: float = 3.0,
    headroom: float = 0.10,
    runtime_host_gib: float = 3.0,
    suggest: bool = True,
    with_deepspeed_estimate: bool = True,
) -> StagePlan:
    """Plans one stage on ``cluster``.

    Args:
        stage: a validated stage.
        cluster: the cluster shape.
        reserve_gib: device memory taken by the CUDA context, cuBLAS/cuDNN workspaces and NCCL, GiB.
        headroom: fragmentation headroom, as a fraction of the dynamic (per-phase) bytes at the peak.
        runtime_host_gib: host memory of a worker process before any model (Python, torch, Ray, CUDA), GiB.
        suggest: when the stage does not fit, plan alternatives and list those that would.
        with_deepspeed_estimate: also report DeepSpeed's own estimate (imports DeepSpeed).

    Returns:
        The stage plan; ``problems`` is empty when it fits.
    """
    stats = model_stats(stage)
    trace = activation_trace(stage)
    return _plan_with(
        stage, cluster, stats, trace,
        reserve_gib=reserve_gib, headroom=headroom, runtime_host_gib=runtime_host_gib,
        suggest=suggest, with_deepspeed_estimate=with_deepspeed_estimate,
    )


def _plan_with(
    stage: StageConfig,
    cluster: ClusterShape,
    stats: ModelStats,
    trace: ActivationTrace,
    *,
    reserve_gib: float,
    headroom: float,
    runtime_host_gib: float,
    suggest: bool,
    with_deepspeed_estimate: bool,
) -> StagePlan:
    device: Tier = "gpu" if cluster.use_gpu else "host"
    ema = stage.regularize.ema_decay is not None and stage.kind != "eval"
    if stage.kind == "eval":
        items = _inference_state_items(stats, stage, cluster.workers, device)
    else:
        items = _model_state_items(stats, stage, cluster.workers, device, ema=ema)
    items += _activation_items(stats, trace, stage.deepspeed.precision, device)
    items += _host_items(stats, stage, trace, ema=ema, runtime_host_bytes=int(runtime_host_gib * GiB))
    plan = StagePlan(
        stage=str(stage.name),
        kind=stage.kind,
        model=stage.model.name,
        image_size=trace.image_size,
        micro_batch=trace.micro_batch,
        grad_accum=stage.deepspeed.grad_accum,
        workers=cluster.workers,
        zero_stage=stage.deepspeed.zero_stage,
        precision=stage.deepspeed.precision,
        stats=stats,
        trace=trace,
        items=items,
        gpu_budget_bytes=int(cluster.gpu_mem_gib * GiB) if cluster.use_gpu else None,
        host_budget_bytes=int(cluster.host_mem_gib * GiB) if cluster.host_mem_gib is not None else None,
        reserve_bytes=int(reserve_gib * GiB) if cluster.use_gpu else 0,
        headroom=headroom,
    )
    if stage.model.num_classes is None:
        plan.notes.append("model.num_classes unset (taken from the manifest at run time): planned with 1000")
    if stage.deepspeed.precision != "fp32":
        plan.notes.append("activations traced in fp32: an upper bound under autocast")
    if "nvme" in (stage.deepspeed.offload_optimizer, stage.deepspeed.offload_param):
        plan.notes.append("NVMe offload: swap/pinned buffers and bandwidth are not modelled")
    _check(plan)
    if with_deepspeed_estimate and stage.kind != "eval":
        try:
            plan.deepspeed_estimate = _deepspeed_estimate(stats, stage, cluster)
        except ImportError as err:  # DeepSpeed is a dependency; still, a plan is useful without it
            plan.deepspeed_estimate = {"function": None, "note": f"deepspeed unavailable: {err}"}
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(
            stage, cluster, stats, trace,
            reserve_gib=reserve_gib, headroom=headroom, runtime_host_gib=runtime_host_gib,
        )
    return plan


def _check(plan: StagePlan) -> None:
    if plan.gpu_budget_bytes is not None:
        need, (peak, phase) = plan.required_bytes("gpu"), plan.peak("gpu")
        if need > plan.gpu_budget_bytes:
            plan.problems.append(
                f"needs {need / GiB:.1f} GiB per GPU (peak {peak / GiB:.1f} GiB in {phase}, model states "
                f"{plan.persistent_bytes('gpu') / GiB:.1f} GiB, + reserve and headroom), "
                f"has {plan.gpu_budget_bytes / GiB:.1f} GiB"
            )
    if plan.host_budget_bytes is not None:
        need, (peak, phase) = plan.required_bytes("host"), plan.peak("host")
        if need > plan.host_budget_bytes:
            plan.problems.append(
                f"needs {need / GiB:.1f} GiB host memory per worker (peak in {phase}), "
                f"has {plan.host_budget_bytes / GiB:.1f} GiB"
            )


def _stage_key(stage: StageConfig) -> str:
    return str(stage.name)


def _suggestions(
    stage: StageConfig,
    cluster: ClusterShape,
    stats: ModelStats,
    trace: ActivationTrace,
    *,
    reserve_gib: float,
    headroom: float,
    runtime_host_gib: float,
) -> list[dict[str, Any]]:
    """Single changes that would make ``stage`` fit, each planned: higher ZeRO stage, smaller micro-batch (with
    more accumulation, same global batch), more workers, optimizer offload. Smaller micro-batches reuse the
    trace scaled by batch (every activation carries the batch dimension)."""
    key = f"stages.{_stage_key(stage)}"
    candidates: list[tuple[list[str], StageConfig, ClusterShape, ActivationTrace, str]] = []
    ds = stage.deepspeed
    for z in range(ds.zero_stage + 1, 4):
        new = stage.model_copy(update={"deepspeed": ds.model_copy(update={"zero_stage": z})})
        candidates.append(([f"{key}.deepspeed.zero_stage={z}"], new, cluster, trace, f"ZeRO-{z}"))
    if stage.kind != "eval" and ds.precision == "fp32":
        new = stage.model_copy(update={"deepspeed": ds.model_copy(update={"precision": "bf16"})})
        candidates.append(([f"{key}.deepspeed.precision=bf16"], new, cluster, trace, "bf16 autocast"))
    micro = trace.micro_batch
    while micro > 1:
        micro //= 2
        factor = trace.micro_batch // micro
        new = stage.model_copy(
            update={
                "data": stage.data.model_copy(update={"batch_size": micro}),
                "deepspeed": ds.model_copy(update={"grad_accum": ds.grad_accum * factor}),
            }
        )
        sets = [f"{key}.data.batch_size={micro}", f"{key}.deepspeed.grad_accum={ds.grad_accum * factor}"]
        candidates.append((sets, new, cluster, trace.scaled(micro), f"micro-batch {micro}, same global batch"))
    for factor in (2, 4, 8):
        if ds.zero_stage == 0:
            break
        more = dataclasses.replace(cluster, workers=cluster.workers * factor)
        candidates.append(
            ([f"scaling.num_workers={more.workers}"], stage, more, trace, f"{more.workers} workers (global batch x{factor})")
        )
    if stage.kind != "eval" and ds.zero_stage >= 1 and ds.offload_optimizer == "none":
        new = stage.model_copy(update={"deepspeed": ds.model_copy(update={"offload_optimizer": "cpu"})})
        candidates.append(([f"{key}.deepspeed.offload_optimizer=cpu"], new, cluster, trace, "optimizer state on the host"))

    out = []
    for sets, new_stage, new_cluster, new_trace, why in candidates:
        alt = _plan_with(
            new_stage, new_cluster, stats, new_trace,
            reserve_gib=reserve_gib, headroom=headroom, runtime_host_gib=runtime_host_gib,
            suggest=False, with_deepspeed_estimate=False,
        )
        tier = alt.device_tier
        out.append(
            {
                "set": sets,
                "why": f"{why}: {alt.required_bytes(tier) / GiB:.1f} GiB per {'GPU' if tier == 'gpu' else 'worker'}",
                "fits": alt.fits,
                "required_bytes": alt.required_bytes(tier),
            }
        )
    # Fitting suggestions first, in the order above (least disruptive first); the largest fitting micro-batch.
    fitting = [s for s in out if s["fits"]]
    micro_fits = [s for s in fitting if "batch_size" in s["set"][0]]
    others = [s for s in fitting if "batch_size" not in s["set"][0]]
    return others + micro_fits[:1] + [s for s in out if not s["fits"]]


def plan_recipe(
    recipe: Recipe,
    cluster: ClusterShape | None = None,
    *,
    stage: str | None = None,
    with_deepspeed_estimate: bool = True,
    **kwargs: Any,
) -> Plan:
    """Plans every stage of ``recipe`` (or only ``stage``) on ``cluster``.

    Args:
        recipe: the validated recipe.
        cluster: the cluster shape; defaults to the recipe's ``scaling``.
        stage: plan only the stage of this name.
        with_deepspeed_estimate: also report DeepSpeed's own model-state estimates.
        **kwargs: passed to :func:`plan_stage` (``reserve_gib``, ``headroom``, ``runtime_host_gib``, ``suggest``).

    Returns:
        The plan; ``plan.fits`` is the verdict.

    Raises:
        KeyError: ``stage`` names no stage of the recipe.
    """
    cluster = cluster or ClusterShape.from_recipe(recipe)
    stages = [recipe.stage(stage)] if stage is not None else list(recipe.stages)
    plans = [plan_stage(s, cluster, with_deepspeed_estimate=with_deepspeed_estimate, **kwargs) for s in stages]
    if cluster.cpus_per_worker is not None:
        sc = recipe.scaling
        need = sc.cpus_per_worker + sc.data_cpus / max(cluster.workers, 1)
        if need > cluster.cpus_per_worker:
            for p in plans:
                p.problems.append(
                    f"needs {need:g} CPUs per worker (scaling.cpus_per_worker={sc.cpus_per_worker:g} + "
                    f"scaling.data_cpus={sc.data_cpus:g} / {cluster.workers} workers), has {cluster.cpus_per_worker:g}"
                )
    return Plan(recipe=recipe.name, cluster=cluster, stages=plans)


# ------------------------------------------------------------------------------------------------- the CLI
def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def format_plan(plan: Plan) -> str:
    """A human-readable report of ``plan``."""
    c = plan.cluster
    host = "unchecked" if c.host_mem_gib is None else f"{c.host_mem_gib:g} GiB"
    lines = [
        f"recipe {plan.recipe}: {c.workers} worker(s), "
        + (f"{c.gpu_mem_gib:g} GiB GPU each" if c.use_gpu else "CPU training")
        + f", host memory per worker {host}",
        f"activations: {ACTIVATION_METHOD}",
    ]
    for s in plan.stages:
        lines.append("")
        lines.append(
            f"stage {s.stage} ({s.kind}): {s.model} {s.stats.params / 1e6:.1f}M params, {s.image_size}px, "
            f"micro-batch {s.micro_batch} x accum {s.grad_accum} x {s.workers} workers = {s.global_batch}, "
            f"ZeRO-{s.zero_stage} {s.precision}"
        )
        for tier in ("gpu", "host", "nvme"):
            items = s.tier_items(tier)
            if not items:
                continue
            peak, phase = s.peak(tier)
            budget = s.gpu_budget_bytes if tier == "gpu" else s.host_budget_bytes if tier == "host" else None
            lines.append(
                f"  {tier}: peak {_gib(peak)} GiB ({phase}); required {_gib(s.required_bytes(tier))} GiB of {_gib(budget)}"
            )
            for i in items:
                lines.append(f"    {_gib(i.bytes):>9} GiB  {'/'.join(i.phases):<22} {i.name}")
        if s.deepspeed_estimate and s.deepspeed_estimate.get("gpu_bytes") is not None:
            lines.append(
                f"  DeepSpeed's estimate of model states (16-bit weights assumed): "
                f"{_gib(s.deepspeed_estimate['gpu_bytes'])} GiB per GPU; ours (fp32 weights): "
                f"{_gib(s.model_state_bytes)} GiB"
            )
        lines.append(
            f"  FLOPs per micro-batch: forward {s.trace.forward_flops / 1e12:.2f} T, step {s.step_flops / 1e12:.2f} T"
            f" ({'4x forward' if s.trace.train else 'forward'})"
        )
        for note in s.notes:
            lines.append(f"  note: {note}")
        if s.fits:
            lines.append("  -> fits")
        else:
            lines.append(f"  -> DOES NOT FIT: {'; '.join(s.problems)}")
            for sug in s.suggestions:
                mark = "fits" if sug["fits"] else "still too big"
                lines.append(f"     try {x_cli(sug)}  ({sug['why']}; {mark})")
    lines.append("")
    lines.append("verdict: " + ("fits" if plan.fits else "does not fit"))
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    cluster = ClusterShape.from_recipe(
        recipe, workers=args.workers, gpu_mem_gib=args.gpu_mem, host_mem_gib=args.cpu_mem, cpus_per_worker=args.cpus
    )
    if args.stage is not None and args.stage not in [s.name for s in recipe.stages]:
        raise ValueError(f"--stage: no stage {args.stage!r}; recipe has {[s.name for s in recipe.stages]}")
    plan = plan_recipe(recipe, cluster, stage=args.stage)
    if not plan.fits:
        print(f"revcol plan: {plan.refusal()}", file=sys.stderr)
    if args.json:
        print(json.dumps(plan.to_dict(), sort_keys=True, default=str))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``revcol plan`` to the CLI's subcommands.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``revcol`` parser.

    Returns:
        The new parser (its ``func`` is set).
    """
    p = subparsers.add_parser(
        "plan",
        help="per-worker memory and step cost of each stage; exit 1 when it cannot fit",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("recipe", help="recipe YAML (see jobs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--workers", type=int, default=None, help="workers (default: scaling.num_workers)")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GiB", help="GPU memory per worker (default: scaling.gpu_memory_gb, else 80)")
    p.add_argument("--cpu-mem", type=float, default=None, metavar="GiB", help="host memory per worker (default: scaling.memory_per_worker_gb)")
    p.add_argument("--cpus", type=float, default=None, metavar="N", help="CPU cores per worker (default: not checked)")
    p.add_argument("--stage", default=None, metavar="NAME", help="plan only this stage")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=_cmd_plan)
    return p

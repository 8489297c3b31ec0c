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
  ZeRO-1/2 also keep a separate fp32 master partition (4/W bytes per parameter): DeepSpeed clones it even from
  fp32 weights. ZeRO-3 uses the fp32 weights as their own master (``stage3.py`` means to, and does once
  ``pipeline.train.deepspeed_fixes.use_fp32_weights_as_zero3_master`` fixes its device check), unless the optimizer is
  offloaded, where the master is a converted copy on the host or NVMe. These per-stage
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
import json
import logging
import math
import sys
import time
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
    "format_plan",
    "model_stats",
    "plan_recipe",
    "plan_stage",
]

logger = logging.getLogger(__name__)

GiB = 2**30
Tier = Literal["gpu", "host", "nvme"]
PHASES: tuple[str, ...] = ("init", "forward", "backward", "grad_reduce", "optimizer_step", "checkpoint")
"""Step phases; an item is alive in some of them, or ``persistent`` (the whole run)."""

ACTIVATION_METHOD = (
    "analytic: live tensor-storage bytes tracked op by op through one fp32 training step (forward, loss, "
    "reversible backward) of the stage's model on fake tensors at the stage's resolution and micro-batch; "
    "upper bound under bf16/fp16 autocast; autocast weight-cast cache added analytically"
)

# Engine constants (fp32 weights + torch autocast, see pipeline/train/engine.py).
_FP32 = 4
_ADAM = 8  # exp_avg + exp_avg_sq, fp32
# DeepSpeed defaults (deepspeed/runtime/zero/config.py and offload_config.py) for what the generated config
# (pipeline.train.engine.deepspeed_config) leaves unset.
_DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
    "offload_optimizer.buffer_count": 4,
    "offload_param.buffer_count": 5,
    "offload_param.buffer_size": 100_000_000,
}
_MIN_SWAP_BYTES = 2**20  # deepspeed/runtime/swap_tensor/constants.py MIN_AIO_BYTES: smaller tensors stay in memory
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
        kind: what sort of state it is, which decides its tier under offload (:func:`_place`): ``parameters``,
            ``persistent_parameters``, ``gradients``, ``master``, ``optimizer``, ``optimizer_step``, ``ema``,
            ``buffer``, ``activations``, ``init``, ``checkpoint``, ``runtime``.
    """

    name: str
    bytes: int
    tier: Tier
    phases: tuple[str, ...] = ("persistent",)
    source: str = "computed"
    kind: str = "other"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
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
        """The items living on ``tier`` (``gpu``, ``host`` or ``nvme``)."""
        return [i for i in self.items if i.tier == tier]

    def phase_bytes(self, tier: str) -> dict[str, int]:
        """Bytes alive in each phase on ``tier`` on top of the persistent ones."""
        return {ph: sum(i.bytes for i in self.tier_items(tier) if ph in i.phases) for ph in PHASES}

    def persistent_bytes(self, tier: str) -> int:
        """Bytes on ``tier`` alive for the whole run."""
        return sum(i.bytes for i in self.tier_items(tier) if "persistent" in i.phases)

    def peak(self, tier: str) -> tuple[int, str]:
        """The most bytes alive on ``tier`` at once.

        Args:
            tier: ``gpu``, ``host`` or ``nvme``.

        Returns:
            ``(bytes, phase)``: persistent bytes plus those of the heaviest phase, and that phase.
        """
        phases = self.phase_bytes(tier)
        phase = max(phases, key=lambda p: phases[p])
        return self.persistent_bytes(tier) + phases[phase], phase

    def required_bytes(self, tier: str) -> int:
        """What ``tier`` must offer per worker for this stage.

        Args:
            tier: ``gpu``, ``host`` or ``nvme``.

        Returns:
            The peak, plus the fragmentation headroom on its phase's bytes, plus (on the training device) the
            runtime reserve.
        """
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
        kinds = ("parameters", "persistent_parameters", "gradients", "master", "optimizer")
        return sum(i.bytes for i in self.items if "persistent" in i.phases and i.kind in kinds)

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
        """A one-paragraph reason naming every stage that does not fit and the single changes that would fit."""
        lines = []
        for s in self.stages:
            if s.fits:
                continue
            fixes = [f"{_as_cli(x)} ({x['why']})" for x in s.suggestions if x["fits"]][:4]
            if fixes:
                hint = f"; fits with any of: {' | '.join(fixes)}"
            elif s.suggestions:
                hint = "; no single change (ZeRO stage, micro-batch, workers, offload) fits alone: combine them"
            else:
                hint = ""
            lines.append(f"stage {s.stage!r}: {'; '.join(s.problems)}{hint}")
        return f"recipe {self.recipe!r} does not fit: " + "\n  ".join(lines)

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


def _as_cli(suggestion: dict[str, Any]) -> str:
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


# ----------------------------------------------------------------------------------------------- the ledger
def _zero_option(ds: DeepSpeedConfig, key: str, *, largest_param: int = 0) -> Any:
    """A ``zero_optimization`` option (``offload_param.buffer_size`` for nested ones) as the run will use it:
    from the generated DeepSpeed config (``deepspeed.extra`` merged in), else DeepSpeed's default."""
    from pipeline.train.engine import deepspeed_config

    zero = deepspeed_config(ds, micro_batch=1, largest_param=largest_param)["zero_optimization"]
    section, _, leaf = key.rpartition(".")
    values = zero.get(section, {}) if section else zero
    for name in (leaf, leaf.removeprefix("stage3_")):
        if name in values:
            return values[name]
    return _DS_DEFAULTS.get(key)


def _place(kind: str, ds: DeepSpeedConfig, device: Tier) -> Tier:
    """Where a kind of model state lives: the one place that knows offload.

    AdamW state and master weights follow ``offload_optimizer`` (``cpu``: host, ``nvme``: NVMe); the sharded
    gradients and the optimizer-step temporaries go with the optimizer to the host (NVMe offload stages them in
    host memory); ZeRO-3 parameter partitions follow ``offload_param``. Everything else stays on the device.
    ZeRO-Infinity's pinned staging and swap buffers, and the offload bandwidth, are not modelled yet: that is
    where an NVMe/CPU offload model adds its own items.
    """
    tier_of: dict[str, Tier] = {"none": device, "cpu": "host", "nvme": "nvme"}
    if kind in ("optimizer", "master"):
        return tier_of[ds.offload_optimizer]
    if kind in ("gradients", "optimizer_step") and ds.zero_stage >= 1 and ds.offload_optimizer != "none":
        return "host"
    if kind in ("swap_buffer", "host_parameters"):
        return "host"
    if kind == "parameters" and ds.zero_stage == 3:
        return tier_of[ds.offload_param]
    return device


def _model_state_items(
    stats: ModelStats, stage: StageConfig, workers: int, device: Tier, *, ema: bool
) -> list[MemoryItem]:
    """Parameters, gradients, master weights, AdamW state, EMA, ZeRO buffers and optimizer-step temporaries of
    one training worker (fp32 weights, see the module docstring)."""
    ds = stage.deepspeed
    z, w, p = ds.zero_stage, workers, stats.params
    own = math.ceil(p / w)  # this rank's partition
    shard = f", 1/{w}" if w > 1 else ""
    items: list[tuple[str, str, int, tuple[str, ...]]] = []  # (kind, name, bytes, phases)
    persistent = ("persistent",)
    if z == 3:
        threshold = int(_zero_option(ds, "stage3_param_persistence_threshold"))
        small = sum(n for n in stats.param_numels if n < threshold)
        items += [
            ("parameters", f"parameters (fp32{shard})", _FP32 * own, persistent),
            ("persistent_parameters", f"parameters kept whole (numel < {threshold}, fp32)", _FP32 * small, persistent),
        ]
        if ds.offload_param == "nvme":  # DeepSpeed's async I/O skips partitions under 1 MiB: they stay in memory
            unswapped = sum(math.ceil(n / w) for n in stats.param_numels if n >= threshold and _FP32 * n / w < _MIN_SWAP_BYTES)
            items.append(("host_parameters", "parameter partitions too small to swap (< 1 MiB, fp32)", _FP32 * unswapped,
                          persistent))
    else:
        items.append(("parameters", "parameters (fp32)", _FP32 * p, persistent))
    if z:
        # ZeRO-1 in DeepSpeed also reduces into the owned partition during backward (measured: ZeRO-1 and ZeRO-2
        # hold the same bytes after backward).
        items.append(("gradients", f"gradients (fp32{shard})", _FP32 * own, persistent))
        # A separate fp32 master partition even for fp32 weights under ZeRO-1/2 (stage_1_and_2.py clones it);
        # ZeRO-3 aliases fp32 weights (see deepspeed_fixes.use_fp32_weights_as_zero3_master) unless it offloads them.
        if z < 3 or ds.offload_optimizer != "none":
            items.append(("master", f"master weights (fp32{shard})", _FP32 * own, persistent))
        items.append(("optimizer", f"AdamW state (exp_avg, exp_avg_sq{shard})", _ADAM * own, persistent))
    else:
        items.append(("gradients", "gradients (fp32)", _FP32 * p, persistent))
        items.append(("optimizer", "AdamW state (exp_avg, exp_avg_sq)", _ADAM * p, persistent))
    if ema:  # pipeline.train.ema.ShardedEma: sharded like the weights under ZeRO-3
        ema_name = f"EMA weights (fp32{shard if z == 3 else ''})"
        items.append(("ema", ema_name, _FP32 * (own if z == 3 else p), persistent))
        items.append(("checkpoint", "EMA gathered whole for a checkpoint (fp32)", _FP32 * p, ("checkpoint",)))

    # Gradient communication buffers.
    bucket = int(_zero_option(ds, "reduce_bucket_size"))
    comm_dtypes = 1 if ds.precision == "fp32" else 2  # under autocast Linear/Conv gradients communicate in 16 bits
    if z == 0:
        if w > 1:
            elements = min(p, _ZERO0_ALLREDUCE_ELEMENTS)
            items.append(("buffer", "gradient all-reduce bucket (fp32)", _FP32 * elements, ("grad_reduce",)))
    elif _zero_option(ds, "contiguous_gradients"):
        overlap = _zero_option(ds, "overlap_comm")
        overlap = z == 3 if overlap is None else bool(overlap)
        if z == 3:  # one bucket per communication dtype, typed like it
            size = (_FP32 + (2 if comm_dtypes == 2 else 0)) * bucket
            name = f"gradient reduce buckets ({comm_dtypes} dtype(s) x {bucket:.0e})"
            items.append(("buffer", name, size, persistent))
        else:  # fp32 staging per communication dtype, doubled with overlap_comm
            copies = comm_dtypes * (2 if overlap else 1)
            size = copies * _FP32 * bucket
            items.append(("buffer", f"gradient reduce buckets ({copies} x {bucket:.0e} fp32)", size, persistent))
    if z == 3:
        prefetch = int(_zero_option(ds, "stage3_prefetch_bucket_size"))
        live = min(stats.largest_layer_params + prefetch, int(_zero_option(ds, "stage3_max_live_parameters")))
        name = "gathered parameters (largest layer + prefetch, fp32)"
        items.append(("buffer", name, _FP32 * live, ("forward", "backward")))
        # Built under zero.Init (pipeline.train.engine.build_model): one module whole at a time.
        items.append(("init", "largest module whole before partitioning (fp32)", _FP32 * stats.largest_layer_params,
                      ("init",)))
        if ds.offload_param == "nvme":
            largest = max(stats.param_numels)
            count = int(_zero_option(ds, "offload_param.buffer_count"))
            size = int(_zero_option(ds, "offload_param.buffer_size", largest_param=largest))
            items.append(("swap_buffer", f"parameter swap buffers ({count} x {size:.1e} fp32)", _FP32 * count * size,
                          persistent))

    # Optimizer step: the flat fp32 gradient of the owned partition, and torch AdamW's foreach temporary (the
    # square root of exp_avg_sq) over the largest parameter group on this rank.
    group = stats.largest_group_params[1 if stage.optim.layer_decay is not None else 0]
    step = ("optimizer_step",)
    if z and ds.offload_optimizer == "nvme":
        # The step swaps one sub-group at a time (weights, gradients, both moments) into pinned buffers and runs
        # CPU Adam there: no other step temporaries.
        count = int(_zero_option(ds, "offload_optimizer.buffer_count"))
        sub_group = min(own, int(_zero_option(ds, "sub_group_size")))
        name = f"optimizer swap buffers ({count} x {sub_group:.1e} fp32)"
        items.append(("swap_buffer", name, _FP32 * count * sub_group, persistent))
    elif z:
        flat = min(own, int(_zero_option(ds, "sub_group_size")))
        items.append(("optimizer_step", "flat fp32 gradient for the optimizer step", _FP32 * flat, step))
        name = "AdamW step temporary (largest group partition)"
        items.append(("optimizer_step", name, _FP32 * math.ceil(group / w), step))
    else:
        items.append(("optimizer_step", "AdamW step temporary (largest group)", _FP32 * group, step))
    return [MemoryItem(name, size, _place(kind, ds, device), phases, kind=kind) for kind, name, size, phases in items]


def _inference_state_items(stats: ModelStats, stage: StageConfig, workers: int, device: Tier) -> list[MemoryItem]:
    """The weights of an evaluation worker (no gradients, no optimizer)."""
    ds, p = stage.deepspeed, stats.params
    if ds.zero_stage != 3:
        return [MemoryItem("parameters (fp32)", _FP32 * p, device, kind="parameters")]
    prefetch = int(_zero_option(ds, "stage3_prefetch_bucket_size"))
    return [
        MemoryItem(f"parameters (fp32, 1/{workers})", _FP32 * math.ceil(p / workers), _place("parameters", ds, device),
                   kind="parameters"),
        MemoryItem("gathered parameters (largest layer + prefetch, fp32)",
                   _FP32 * (stats.largest_layer_params + prefetch), device, ("forward",), kind="buffer"),
        MemoryItem("parameters whole before partitioning (fp32)", _FP32 * p, device, ("init",), kind="init"),
    ]


def _activation_items(stats: ModelStats, trace: ActivationTrace, precision: str, device: Tier) -> list[MemoryItem]:
    """Traced activations per phase, plus autocast's cache of 16-bit weight copies."""
    items = [
        MemoryItem("activations: forward peak (traced)", trace.forward_peak_bytes, device, ("forward",), "traced",
                   kind="activations"),
    ]
    if trace.train:
        items.append(MemoryItem("activations: kept for backward + recompute working set (traced)",
                                trace.backward_peak_bytes, device, ("backward",), "traced", kind="activations"))
    if precision != "fp32":
        # torch.autocast caches the cast of every leaf fp32 weight it casts until the outermost autocast exits:
        # the engine's forward holds all of them; the reversible backward re-enters autocast per column.
        items.append(MemoryItem("autocast weight-cast cache (16-bit Linear/Conv weights)", 2 * stats.cast_params,
                                device, ("forward",), kind="activations"))
        if trace.train:
            items.append(MemoryItem("autocast weight-cast cache, one column's recompute", 2 * stats.column_cast_params,
                                    device, ("backward",), kind="activations"))
    return items


def _host_items(
    stats: ModelStats, stage: StageConfig, trace: ActivationTrace, *, ema: bool, runtime_host_bytes: int
) -> list[MemoryItem]:
    """Host memory of a worker process besides offloaded states: runtime, input batches, the fp32 model built on
    the host (and init weights read there) before DeepSpeed, and checkpoint/export copies (rank 0)."""
    p = stats.params
    batch_bytes = _PREFETCH_BATCHES * trace.micro_batch * 3 * trace.image_size**2 * _FP32
    items = [
        MemoryItem("process runtime (Python, torch, Ray, CUDA host side)", runtime_host_bytes, "host",
                   source="assumed", kind="runtime"),
        MemoryItem(f"input batches in flight ({_PREFETCH_BATCHES}, fp32)", batch_bytes, "host", kind="runtime"),
    ]
    partitioned = stage.deepspeed.zero_stage == 3 and stage.kind != "eval"  # built under zero.Init, exported streamed
    if not partitioned:
        items.append(MemoryItem("model built on the host before DeepSpeed (fp32)", _FP32 * p, "host", ("init",),
                                kind="init"))
    if stage.init_from:
        items.append(MemoryItem("init_from weights read on the host (fp32)", _FP32 * p, "host", ("init",), kind="init"))
    if stage.kind != "eval":
        exported = max(stats.param_numels) if partitioned else p
        items.append(MemoryItem("exported weights on the host (rank 0, fp32)", _FP32 * exported, "host", ("checkpoint",),
                                kind="checkpoint"))
        if ema:
            items.append(MemoryItem("EMA copied to the host for saving (fp32)", _FP32 * p, "host", ("checkpoint",),
                                    kind="checkpoint"))
    return items


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
    cpus_needed: float | None = None,
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
        cpus_needed: CPU cores a worker reserves (its trainer CPUs and its share of the data CPUs), checked
            against ``cluster.cpus_per_worker``; None: not checked.
        reserve_gib: device memory taken by the CUDA context, cuBLAS/cuDNN workspaces and NCCL, GiB.
        headroom: fragmentation headroom, as a fraction of the dynamic (per-phase) bytes at the peak.
        runtime_host_gib: host memory of a worker process before any model (Python, torch, Ray, CUDA), GiB.
        suggest: when the stage does not fit, plan single changes and list them, those that fit first.
        with_deepspeed_estimate: also report DeepSpeed's own estimate (imports DeepSpeed).

    Returns:
        The stage plan; ``problems`` is empty when it fits.
    """
    settings = _Settings(cpus_needed=cpus_needed, reserve_gib=reserve_gib, headroom=headroom,
                         runtime_host_gib=runtime_host_gib)
    plan = _plan_with(stage, cluster, model_stats(stage), activation_trace(stage), settings)
    if with_deepspeed_estimate and stage.kind != "eval":
        plan.deepspeed_estimate = _deepspeed_estimate(plan.stats, stage, cluster)
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(stage, cluster, plan, settings)
    return plan


@dataclass(frozen=True)
class _Settings:
    cpus_needed: float | None
    reserve_gib: float
    headroom: float
    runtime_host_gib: float


def _plan_with(
    stage: StageConfig, cluster: ClusterShape, stats: ModelStats, trace: ActivationTrace, settings: _Settings
) -> StagePlan:
    device: Tier = "gpu" if cluster.use_gpu else "host"
    ema = stage.regularize.ema_decay is not None and stage.kind != "eval"
    if stage.kind == "eval":
        items = _inference_state_items(stats, stage, cluster.workers, device)
    else:
        items = _model_state_items(stats, stage, cluster.workers, device, ema=ema)
    items += _activation_items(stats, trace, stage.deepspeed.precision, device)
    items += _host_items(stats, stage, trace, ema=ema, runtime_host_bytes=int(settings.runtime_host_gib * GiB))
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
        reserve_bytes=int(settings.reserve_gib * GiB) if cluster.use_gpu else 0,
        headroom=settings.headroom,
    )
    if stage.model.num_classes is None:
        plan.notes.append("model.num_classes unset (taken from the manifest at run time): planned with 1000")
    if stage.deepspeed.precision != "fp32":
        plan.notes.append("activations traced in fp32: an upper bound under autocast")
    if "nvme" in (stage.deepspeed.offload_optimizer, stage.deepspeed.offload_param):
        plan.notes.append("NVMe offload: swap buffers modelled, disk bandwidth (the step time) is not")
    _check(plan, cluster, settings.cpus_needed)
    return plan


def _check(plan: StagePlan, cluster: ClusterShape, cpus_needed: float | None) -> None:
    """Fills ``plan.problems``: device memory, host memory, CPU cores."""
    if plan.gpu_budget_bytes is not None:
        need, (peak, phase) = plan.required_bytes("gpu"), plan.peak("gpu")
        if need > plan.gpu_budget_bytes:
            plan.problems.append(
                f"needs {need / GiB:.1f} GiB per GPU (peak {peak / GiB:.1f} GiB in {phase}, of which "
                f"{plan.persistent_bytes('gpu') / GiB:.1f} GiB for the whole run; plus reserve and headroom), "
                f"has {plan.gpu_budget_bytes / GiB:.1f} GiB"
            )
    if plan.host_budget_bytes is not None:
        need, (_, phase) = plan.required_bytes("host"), plan.peak("host")
        if need > plan.host_budget_bytes:
            plan.problems.append(
                f"needs {need / GiB:.1f} GiB host memory per worker (peak in {phase}), "
                f"has {plan.host_budget_bytes / GiB:.1f} GiB: raise scaling.memory_per_worker_gb (or use fewer "
                f"workers per node)"
            )
    if cpus_needed is not None and cluster.cpus_per_worker is not None and cpus_needed > cluster.cpus_per_worker:
        plan.problems.append(
            f"needs {cpus_needed:g} CPUs per worker (scaling.cpus_per_worker plus its share of scaling.data_cpus), "
            f"has {cluster.cpus_per_worker:g}: lower scaling.data_cpus or scaling.cpus_per_worker"
        )


def _divisors_below(n: int) -> list[int]:
    return [d for d in range(n - 1, 0, -1) if n % d == 0]


def _suggestions(
    stage: StageConfig, cluster: ClusterShape, plan: StagePlan, settings: _Settings
) -> list[dict[str, Any]]:
    """Single changes to ``stage`` or the cluster, each planned: a higher ZeRO stage, a smaller micro-batch with
    more accumulation (same global batch; the trace scaled, since every activation carries the batch dimension),
    more workers (sharded states shrink; the global batch grows), optimizer offload to the host, more host
    memory. Those that fit come first: higher ZeRO stages, then the largest fitting micro-batch, then the rest."""
    key = f"stages.{stage.name}"
    ds, trace = stage.deepspeed, plan.trace
    candidates: list[tuple[list[str], StageConfig, ClusterShape, ActivationTrace, str]] = []

    def with_ds(**update: Any) -> StageConfig:
        return stage.model_copy(update={"deepspeed": ds.model_copy(update=update)})

    for z in range(ds.zero_stage + 1, 4):
        candidates.append(([f"{key}.deepspeed.zero_stage={z}"], with_ds(zero_stage=z), cluster, trace, f"ZeRO-{z}"))
    for micro in _divisors_below(trace.micro_batch):
        accum = ds.grad_accum * (trace.micro_batch // micro)
        new = stage.model_copy(update={"data": stage.data.model_copy(update={"batch_size": micro}),
                                       "deepspeed": ds.model_copy(update={"grad_accum": accum})})
        sets = [f"{key}.data.batch_size={micro}", f"{key}.deepspeed.grad_accum={accum}"]
        candidates.append((sets, new, cluster, trace.scaled(micro), f"micro-batch {micro}, same global batch"))
    if ds.zero_stage:
        for factor in (2, 4):
            more = dataclasses.replace(cluster, workers=cluster.workers * factor)
            why = f"{more.workers} workers (global batch x{factor})"
            candidates.append(([f"scaling.num_workers={more.workers}"], stage, more, trace, why))
    if stage.kind != "eval" and ds.zero_stage and ds.offload_optimizer == "none":
        candidates.append(([f"{key}.deepspeed.offload_optimizer=cpu"], with_ds(offload_optimizer="cpu"), cluster,
                           trace, "optimizer state on the host"))
    if plan.host_budget_bytes is not None and plan.required_bytes("host") > plan.host_budget_bytes:
        gib = math.ceil(plan.required_bytes("host") / GiB)
        bigger = dataclasses.replace(cluster, host_mem_gib=gib)
        candidates.append(([f"scaling.memory_per_worker_gb={gib}"], stage, bigger, trace, f"{gib} GiB host per worker"))

    out = []
    for sets, new_stage, new_cluster, new_trace, why in candidates:
        alt = _plan_with(new_stage, new_cluster, plan.stats, new_trace, settings)
        tier = alt.device_tier
        need = alt.required_bytes(tier)
        out.append({"set": sets, "why": f"{why}: {need / GiB:.1f} GiB per {'GPU' if tier == 'gpu' else 'worker'}",
                    "fits": alt.fits, "required_bytes": need})
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
    sc = recipe.scaling
    cpus = sc.cpus_per_worker + sc.data_cpus / cluster.workers
    plans = [
        plan_stage(s, cluster, cpus_needed=cpus, with_deepspeed_estimate=with_deepspeed_estimate, **kwargs)
        for s in stages
    ]
    return Plan(recipe=recipe.name, cluster=cluster, stages=plans)


# ------------------------------------------------------------------------------------------------- the CLI
def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def format_plan(plan: Plan) -> str:
    """A human-readable report: per stage, every item by tier with its phases, peaks, FLOPs and the verdict.

    Args:
        plan: a plan from :func:`plan_recipe`.

    Returns:
        The report, several lines.
    """
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
                f"  {tier}: peak {_gib(peak)} GiB ({phase}); "
                f"required {_gib(s.required_bytes(tier))} GiB of {_gib(budget)}"
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
                lines.append(f"     try {_as_cli(sug)}  ({sug['why']}; {mark})")
    lines.append("")
    lines.append("verdict: " + ("fits" if plan.fits else "does not fit"))
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    """``revcol plan``: exit status 0 when every planned stage fits, 1 (reason on stderr) when one does not."""
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
    p.add_argument(
        "--gpu-mem", type=float, default=None, metavar="GiB",
        help="GPU memory per worker (default: scaling.gpu_memory_gb, else 80)",
    )
    p.add_argument(
        "--cpu-mem", type=float, default=None, metavar="GiB",
        help="host memory per worker (default: scaling.memory_per_worker_gb; unchecked without)",
    )
    p.add_argument("--cpus", type=float, default=None, metavar="N", help="CPU cores per worker (default: not checked)")
    p.add_argument("--stage", default=None, metavar="NAME", help="plan only this stage")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=_cmd_plan)
    return p
